"""Stage download_preferences: fetch the preference data (params `download_preferences`) to --out.

The book's 1,100 instruction entries with a `chosen` and a `rejected` response each (ch. 7, DPO).
Honours GPTCORE_MIRROR (served from the mirror as `instruction-data-with-preference.json`).
"""

from gptcore.arguments import ArgumentParser
from gptcore.download import fetch
from gptcore.entry import run_entry
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--out", required=True, help="where the JSON list of entries goes")
    args = parser.parse_args()
    params = load_params(args.params).download_preferences
    path = fetch(params.url, args.out, mirror_name="instruction-data-with-preference.json", sha256=params.sha256)
    print(f"download_preferences: {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
