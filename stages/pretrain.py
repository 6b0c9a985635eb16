"""Stage pretrain (Stage 1): train GPTModel from scratch on the corpus.

Reads params `pretrain:` and the top-level `seed`, `device`, `precision`. Writes the weights file, a
sample continuation, and through DVCLive (gptcore/training/live.py) the metrics JSON, rewritten at every
evaluation while it trains, and the plots folder: one table per logged value and the loss figure.
Progress is kept in --progress-dir, so an interrupted run resumes where it stopped. dvc.yaml starts it with glibc's
allocator set to keep freed memory (every step has the same shapes; gptcore/training/allocator.py).
"""

from gptcore.arguments import ArgumentParser
from gptcore.atomic import write_text
from gptcore.device import is_main_process
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.recipes.pretrain import pretrain
from gptcore.training.live import TrainingLog
from gptcore.training.plots import line_figure
from gptcore.weights import save_model

LOGGED = ["epoch", "tokens_seen", "train_loss", "val_loss"]


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--corpus", required=True, help="the training text (UTF-8)")
    parser.add_argument("--out", required=True, help="weights file")
    parser.add_argument(
        "--metrics", required=True, help="metrics JSON (live while training; then final losses, tokens seen, timing)"
    )
    parser.add_argument(
        "--plots", required=True, help="plots folder: metrics/<value>.tsv per evaluation, images/loss.png"
    )
    parser.add_argument("--sample", required=True, help="text file: a continuation of sample_prompt after training")
    parser.add_argument("--progress-dir", required=True, help="resumable progress (kept between runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    with TrainingLog(args.metrics, args.plots, LOGGED) as log:
        outcome = pretrain(args.corpus, params.pretrain, params.run, args.progress_dir, report=log.update)
        if not is_main_process():  # under torchrun, rank 0 writes the outputs
            return
        save_model(outcome.model, args.out)
        write_text(args.sample, outcome.sample + "\n")
        loss = line_figure(
            outcome.result.history,
            "tokens_seen",
            ["train_loss", "val_loss"],
            title="Stage 1 pretraining: loss",
            xlabel="tokens seen",
            ylabel="cross-entropy loss (nats per token)",
        )
        log.finish(outcome.metrics, images={"loss.png": loss})
    outcome.progress.finish(outcome.metrics)
    m = outcome.metrics
    print(
        f"pretrain: train loss {m['train_loss']:.3f}, val loss {m['val_loss']:.3f}, "
        f"{m['tokens_seen']:,} tokens in {m['train_seconds']:.0f}s -> {args.out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
