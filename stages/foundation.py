"""Stage foundation: the weights file (--out) the finetuning stages start from, as params `foundation`
names it. An OpenAI GPT-2 (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl): its TensorFlow checkpoint
(seven files from `download_gpt2.base_url`) is fetched into --openai-dir/<size>/, kept there for the next
switch, and converted; unfinished downloads wait in --partial-dir/<size>/. `pretrained` / `scratch`:
Stage 1's weights file (--pretrained / --scratch) is copied.

Honours GPTCORE_MIRROR (OpenAI's files served from gpt2/models/<size>/<file>).
"""

from gptcore.arguments import ArgumentParser
from gptcore.convert.openai import TENSORFLOW_ENV, prepare_foundation
from gptcore.entry import run_entry, set_environ_defaults
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--pretrained", required=True, help="Stage 1's pretrained weights file")
    parser.add_argument("--scratch", required=True, help="Stage 1's randomly initialised weights file")
    parser.add_argument("--openai-dir", required=True, help="folder of OpenAI checkpoints, one subfolder per size")
    parser.add_argument("--partial-dir", required=True, help="where unfinished downloads wait to be resumed")
    parser.add_argument("--out", required=True, help="the foundation's weights file")
    args = parser.parse_args()
    params = load_params(args.params)
    set_environ_defaults(TENSORFLOW_ENV)  # before TensorFlow is imported (an OpenAI foundation converts)
    source = prepare_foundation(
        params.foundation,
        args.out,
        pretrained=args.pretrained,
        scratch=args.scratch,
        openai_dir=args.openai_dir,
        partial_dir=args.partial_dir,
        base_url=params.download_gpt2.base_url,
    )
    print(f"foundation: {params.foundation} ({source}) -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
