"""Stage download_corpus: fetch the pretraining text (params `download_corpus.url`) to --out.

Honours GPTCORE_MIRROR (the file is served from the mirror by its name).
"""

from gptcore.arguments import ArgumentParser
from gptcore.download import fetch
from gptcore.entry import run_entry
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--out", required=True, help="where the text goes")
    args = parser.parse_args()
    params = load_params(args.params).download_corpus
    path = fetch(params.url, args.out, sha256=params.sha256)
    print(f"download_corpus: {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
