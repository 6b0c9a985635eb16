"""Stage prepare_instructions: validate the instruction data and split it as the book does.

Reads --data (a JSON list of {instruction, input, output}) and params `prepare_instructions`.
Writes --out-dir/{train,validation,test}.json, the entries unchanged; nothing when an entry is bad.
"""

import json

from gptcore.arguments import ArgumentParser
from gptcore.atomic import atomic_dir
from gptcore.data.instructions import read_instructions, split_instructions
from gptcore.entry import run_entry
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--data", required=True, help="instruction data (JSON list of {instruction, input, output})")
    parser.add_argument("--out-dir", required=True, help="folder for train.json, validation.json and test.json")
    args = parser.parse_args()
    params = load_params(args.params).prepare_instructions
    entries = read_instructions(args.data)
    splits = split_instructions(entries, params.train_ratio, params.test_ratio, params.shuffle_seed, source=args.data)
    with atomic_dir(args.out_dir) as tmp:
        for name, part in splits.items():
            (tmp / f"{name}.json").write_text(json.dumps(part, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = ", ".join(f"{len(part)} {name}" for name, part in splits.items())
    print(f"prepare_instructions: {len(entries)} entries -> {counts} in {args.out_dir}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
