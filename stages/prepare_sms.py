"""Stage prepare_sms: balance and split the SMS collection as the book does (params `prepare_sms:`).

Reads SMSSpamCollection with quoting disabled; writes the train, validation and test CSVs (pandas
to_csv(index=False); columns Label: 0 ham / 1 spam, and Text).
"""

from gptcore.arguments import ArgumentParser
from gptcore.atomic import write_text
from gptcore.data.sms import SPLITS, read_collection, split_collection, to_csv_text
from gptcore.entry import run_entry
from gptcore.params.load import load_params


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--collection", required=True, help="SMSSpamCollection")
    for name in SPLITS:
        parser.add_argument(f"--{name}", required=True, help=f"the {name} split CSV to write")
    args = parser.parse_args()
    params = load_params(args.params).prepare_sms
    frame = read_collection(args.collection)
    splits = split_collection(frame, params.seed, params.train_frac, params.validation_frac)
    for name in SPLITS:
        write_text(getattr(args, name), to_csv_text(splits[name]))
    sizes = ", ".join(f"{len(splits[n]):,} {n} ({int(splits[n]['Label'].sum())} spam)" for n in SPLITS)
    print(f"prepare_sms: {len(frame):,} messages -> {sizes}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
