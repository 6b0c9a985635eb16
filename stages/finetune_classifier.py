"""Stage finetune_classifier (Stage 3): finetune models/<foundation> into the SMS spam classifier.

Reads params `classifier:` and the top-level `seed`, `device`, `precision`; the foundation weights
file and the prepared splits come from the command line. Writes the classifier weights file (with
its padding rule in the metadata; under `trainable: lora` the adapters merged into it, and the adapter
file beside it), and through DVCLive (gptcore/training/live.py) the metrics JSON, rewritten
at every evaluation while it trains and ending with the accuracies on the full splits, and the plots
folder: one table per logged value, the loss and accuracy figures, and the test set's confusion
table. Progress is kept in --progress-dir, so an interrupted run resumes where it stopped. dvc.yaml starts
it with glibc's allocator set to keep freed memory (every step has the same shapes; gptcore/training/allocator.py).
"""

from gptcore.arguments import ArgumentParser
from gptcore.data.sms import SPLITS
from gptcore.device import is_main_process
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.recipes.adapters import write_adapter
from gptcore.recipes.classifier import CLASSIFIER_HEAD, save_classifier
from gptcore.recipes.classify import finetune_classifier
from gptcore.recipes.merge import merge_adapter
from gptcore.training.live import TrainingLog
from gptcore.training.plots import line_figure

LOGGED = ["epoch", "examples_seen", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--foundation", required=True, help="weights file to start from")
    for name in SPLITS:
        parser.add_argument(f"--{name}", required=True, help=f"the {name} split CSV")
    parser.add_argument("--out", required=True, help="classifier weights file (adapters merged, under LoRA)")
    parser.add_argument(
        "--adapter-out", required=True, help="the LoRA adapter file, written with classifier.trainable: lora"
    )
    parser.add_argument(
        "--metrics",
        required=True,
        help="metrics JSON (live while training; then accuracies on the full splits, test loss, timing)",
    )
    parser.add_argument(
        "--plots",
        required=True,
        help="plots folder: metrics/<value>.tsv per evaluation, "
        "images/loss.png, images/accuracy.png, sklearn/confusion_matrix.json",
    )
    parser.add_argument("--progress-dir", required=True, help="resumable progress (kept between runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    with TrainingLog(args.metrics, args.plots, LOGGED) as log:
        outcome = finetune_classifier(
            args.foundation,
            {name: getattr(args, name) for name in SPLITS},
            params.classifier,
            params.run,
            args.progress_dir,
            report=log.update,
        )
        if not is_main_process():  # under torchrun, rank 0 writes the outputs
            return
        history = outcome.result.history
        if outcome.lora is None:
            save_classifier(outcome.model, outcome.info, args.out)
        else:  # the adapter (with the head and how to read inputs), then the merged weights from the foundation's file
            extra = outcome.info.to_metadata()
            write_adapter(outcome.model, outcome.lora, args.foundation, args.adapter_out, CLASSIFIER_HEAD, extra)
            merge_adapter(args.foundation, args.adapter_out, args.out)
        figures = {
            "loss.png": line_figure(
                history,
                "examples_seen",
                ["train_loss", "val_loss"],
                title="Spam classifier: loss",
                xlabel="examples seen (messages)",
                ylabel="cross-entropy loss (nats per message)",
            ),
            "accuracy.png": line_figure(
                history,
                "examples_seen",
                ["train_accuracy", "val_accuracy"],
                title="Spam classifier: accuracy on a few batches per point",
                xlabel="examples seen (messages)",
                ylabel="accuracy (fraction correct)",
            ),
        }
        confusion = ([row["actual"] for row in outcome.confusion], [row["predicted"] for row in outcome.confusion])
        log.finish(outcome.metrics, images=figures, confusion=confusion)
    outcome.progress.finish(outcome.metrics)
    m = outcome.metrics
    print(
        f"finetune_classifier: test accuracy {m['test_accuracy']:.2%} (val {m['val_accuracy']:.2%}, "
        f"train {m['train_accuracy']:.2%}), {m['steps']} steps in {m['train_seconds']:.0f}s -> {args.out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
