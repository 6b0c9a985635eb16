"""Stage prepare_preferences: validate the preference data, split it as Stage 4's instructions, and
store the reference log-probabilities of every response, computed once with the frozen Stage 4 model.

Reads --data (a JSON list of {instruction, input, output, chosen, rejected}), --model (the Stage 4
weights), params `prepare_instructions` (the split), `preferences.allowed_max_length` and
`preferences.batch_size`, and the top-level `device`, `precision`. Writes --out-dir/{train,validation,
test}.json (each entry with `reference_logprobs` and `reference_tokens`) and reference.json (the
model's digest and the settings); nothing when an entry is bad.
"""

import json

from gptcore.arguments import ArgumentParser
from gptcore.atomic import atomic_dir
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.recipes.preferences import INFO, prepare_preferences


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--data", required=True, help="preference data (JSON list of entries with chosen, rejected)")
    parser.add_argument("--model", required=True, help="the Stage 4 model: the reference of DPO")
    parser.add_argument("--out-dir", required=True, help="folder for train/validation/test.json and reference.json")
    args = parser.parse_args()
    params = load_params(args.params)
    splits, info = prepare_preferences(
        args.data, args.model, params.prepare_instructions, params.preferences, params.run
    )
    files = {f"{name}.json": part for name, part in splits.items()} | {INFO: info}
    with atomic_dir(args.out_dir) as tmp:
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = ", ".join(f"{len(part)} {name}" for name, part in splits.items())
    print(f"prepare_preferences: {counts} pairs with reference log-probs ({info['precision']}) -> {args.out_dir}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
