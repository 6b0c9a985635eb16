"""Stage download_sms: the UCI SMS Spam Collection zip (params `download_sms:`) -> SMSSpamCollection at --out.

Honours GPTCORE_MIRROR (the zip is served from the mirror as sms+spam+collection.zip). Only the member
named SMSSpamCollection is read (archives with unsafe member paths are refused); it is checked to be
UTF-8 `ham|spam<TAB>text` lines, `expected_rows` of them, before it is written.
"""

from gptcore.arguments import ArgumentParser
from gptcore.data.sms import fetch_collection
from gptcore.entry import run_entry
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--out", required=True, help="where SMSSpamCollection goes")
    args = parser.parse_args()
    params = load_params(args.params).download_sms
    counts = fetch_collection(params.url, args.out, backup_url=params.backup_url, expected_rows=params.expected_rows)
    print(
        f"download_sms: {sum(counts.values()):,} messages ({counts['ham']:,} ham, {counts['spam']:,} spam) -> {args.out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
