"""Stage baseline_classifier: TF-IDF + logistic regression (scikit-learn) on the prepared SMS splits.

The reference row the GPT classifier is compared with; writes metrics with the same keys as
finetune_classifier's (accuracies on the full splits; test loss is the log loss).
"""

from gptcore.arguments import ArgumentParser
from gptcore.atomic import write_json
from gptcore.data.sms import SPLITS, read_split
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.recipes.baseline import fit_baseline


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    for name in SPLITS:
        parser.add_argument(f"--{name}", required=True, help=f"the {name} split CSV")
    parser.add_argument("--metrics", required=True, help="metrics JSON (accuracies, F1, log loss)")
    args = parser.parse_args()
    load_params(args.params)  # not read here, but a bad value anywhere stops every stage
    metrics, _ = fit_baseline({name: read_split(getattr(args, name)) for name in SPLITS})
    write_json(args.metrics, metrics)
    print(
        f"baseline_classifier: TF-IDF + logistic regression, test accuracy {metrics['test_accuracy']:.2%}, "
        f"F1 {metrics['test_f1']:.3f} -> {args.metrics}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
