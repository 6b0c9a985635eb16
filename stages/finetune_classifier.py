"""Stage finetune_classifier (Stage 3): finetune models/<foundation> into the SMS spam classifier.

Reads params `classifier:` and the top-level `seed`, `device`, `precision`; the foundation weights
file and the prepared splits come from the command line. Writes the classifier weights file (with
its padding rule in the metadata), metrics JSON (accuracies on the full splits), per-step loss and
accuracy tables (CSV) and figures (PNG), and the test set's confusion table. Progress is kept in
--checkpoint-dir, so an interrupted run resumes where it stopped. dvc.yaml starts it with glibc's
allocator set to keep freed memory (every step has the same shapes; gptcore/memory.py).
"""

from gptcore.atomic import write_json
from gptcore.classify import finetune_classifier, save_classifier
from gptcore.arguments import ArgumentParser
from gptcore.entry import run_entry
from gptcore.data.sms import SPLITS
from gptcore.device import is_main_process
from gptcore.params import load_params
from gptcore.plots import plot_curves, write_table

LOSS = ["step", "epoch", "examples_seen", "train_loss", "val_loss"]
ACCURACY = ["step", "epoch", "examples_seen", "train_accuracy", "val_accuracy"]


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--foundation", required=True, help="weights file to start from")
    for name in SPLITS:
        parser.add_argument(f"--{name}", required=True, help=f"the {name} split CSV")
    parser.add_argument("--out", required=True, help="classifier weights file")
    parser.add_argument("--metrics", required=True, help="metrics JSON (accuracies on the full splits, test loss, timing)")
    parser.add_argument("--loss-table", required=True, help="CSV: train and validation loss per evaluation")
    parser.add_argument("--accuracy-table", required=True, help="CSV: train and validation accuracy per evaluation")
    parser.add_argument("--confusion", required=True, help="test set actual/predicted table")
    parser.add_argument("--loss-png", required=True, help="figure of the loss table")
    parser.add_argument("--accuracy-png", required=True, help="figure of the accuracy table")
    parser.add_argument("--checkpoint-dir", required=True, help="resumable progress (kept between runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    outcome = finetune_classifier(
        args.foundation, {name: getattr(args, name) for name in SPLITS},
        params.classifier, params.run, args.checkpoint_dir,
    )
    if not is_main_process():  # under torchrun, rank 0 writes the outputs
        return
    history = outcome.result.history
    save_classifier(outcome.model, outcome.info, args.out)
    write_json(args.metrics, outcome.metrics)
    write_table(args.loss_table, history, LOSS)
    write_table(args.accuracy_table, history, ACCURACY)
    write_table(args.confusion, outcome.confusion, ["actual", "predicted"])
    plot_curves(args.loss_png, history, ["train_loss", "val_loss"], x="examples_seen", title="Spam classifier: loss")
    plot_curves(args.accuracy_png, history, ["train_accuracy", "val_accuracy"], x="examples_seen",
                ylabel="accuracy", title="Spam classifier: accuracy (a few batches per point)")
    outcome.checkpoint.finish(outcome.metrics)
    m = outcome.metrics
    print(f"finetune_classifier: test accuracy {m['test_accuracy']:.2%} (val {m['val_accuracy']:.2%}, "
          f"train {m['train_accuracy']:.2%}), {m['steps']} steps in {m['train_seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
