"""Stage foundation: the weights file (--out) the finetuning stages start from, as params `foundation`
names it, made from --source, that foundation's folder (models/<foundation>/ in dvc.yaml). An OpenAI
GPT-2 (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl): the TensorFlow checkpoint that the download_gpt2
stage fetched into the folder is converted. `pretrained` / `scratch`: Stage 1's weights file in the
folder (model.safetensors) is copied.
"""

from gptcore.arguments import ArgumentParser
from gptcore.convert.openai import TENSORFLOW_ENV, prepare_foundation
from gptcore.entry import run_entry, set_environ_defaults
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument(
        "--source", required=True, help="the foundation's folder: an OpenAI checkpoint, or Stage 1's weights"
    )
    parser.add_argument("--out", required=True, help="the foundation's weights file")
    args = parser.parse_args()
    params = load_params(args.params)
    set_environ_defaults(TENSORFLOW_ENV)  # before TensorFlow is imported (an OpenAI foundation converts)
    source = prepare_foundation(params.foundation, args.source, args.out)
    print(f"foundation: {params.foundation} ({source}) -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
