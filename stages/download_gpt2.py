"""Stage download_gpt2: the TensorFlow checkpoint of the OpenAI GPT-2 that params `foundation` names
(gpt2-small, gpt2-medium, gpt2-large, gpt2-xl): OpenAI's seven files from `download_gpt2.base_url`
+ /<size>/<file>, fetched into --models-dir/<foundation>/, where the foundation stage converts them.
The four OpenAI folders are the stage's outputs: the ones not chosen are kept as they are (a size fetched
before stays, so switching back costs no download) or made empty. Nothing is fetched for `pretrained` /
`scratch`. Unfinished downloads wait in --partial-dir/<size>/.

Honours GPTCORE_MIRROR (OpenAI's files served from gpt2/models/<size>/<file>).
"""

from gptcore.arguments import ArgumentParser
from gptcore.convert.openai_download import fetch_openai_foundation
from gptcore.entry import run_entry
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--models-dir", required=True, help="the folder of models/<foundation>/ folders")
    parser.add_argument("--partial-dir", required=True, help="where unfinished downloads wait to be resumed")
    args = parser.parse_args()
    params = load_params(args.params)
    folder = fetch_openai_foundation(
        params.foundation, args.models_dir, base_url=params.download_gpt2.base_url, partial_dir=args.partial_dir
    )
    print(f"download_gpt2: {params.foundation}: " + (f"-> {folder}" if folder else "from Stage 1, nothing to fetch"))


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
