"""Stage finetune_instructions (Stage 4): finetune the foundation model to follow instructions.

Reads --model (models/<foundation>/model.safetensors, a language model), the train and validation
splits, params `instructions:` and the top-level `seed`, `device`, `precision`. Writes the finetuned
weights, and through DVCLive (gptcore/training/live.py) the metrics JSON (losses before and after), rewritten
at every evaluation while it trains, and the plots folder: one table per logged value and the loss
figure. Progress is kept in --progress-dir, so an interrupted run resumes where it stopped.
"""

from gptcore.arguments import ArgumentParser
from gptcore.device import is_main_process
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.prompt import PROMPT_FORMAT, PROMPT_FORMAT_KEY
from gptcore.recipes.instruct import finetune_instructions
from gptcore.training.live import TrainingLog
from gptcore.training.plots import line_figure
from gptcore.weights import save_model

LOGGED = ["epoch", "tokens_seen", "train_loss", "val_loss"]


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--model", required=True, help="foundation weights file")
    parser.add_argument("--train", required=True, help="train split (JSON list of entries)")
    parser.add_argument("--val", required=True, help="validation split (JSON list of entries)")
    parser.add_argument("--out", required=True, help="finetuned weights file")
    parser.add_argument(
        "--metrics", required=True, help="metrics JSON (live while training; then losses before and after, timing)"
    )
    parser.add_argument(
        "--plots", required=True, help="plots folder: metrics/<value>.tsv per evaluation, images/loss.png"
    )
    parser.add_argument("--progress-dir", required=True, help="resumable progress (kept between runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    with TrainingLog(args.metrics, args.plots, LOGGED) as log:
        outcome = finetune_instructions(
            args.model,
            args.train,
            args.val,
            params.instructions,
            params.run,
            args.progress_dir,
            report=log.update,
        )
        if not is_main_process():  # under torchrun, rank 0 writes the outputs
            return
        save_model(outcome.model, args.out, extra={PROMPT_FORMAT_KEY: PROMPT_FORMAT})  # exports add the template
        loss = line_figure(
            outcome.history,
            "tokens_seen",
            ["train_loss", "val_loss"],
            title="Stage 4 instruction finetuning: loss",
            xlabel="tokens seen (padding included)",
            ylabel="cross-entropy loss (nats per token)",
        )
        log.finish(outcome.metrics, images={"loss.png": loss})
    outcome.progress.finish(outcome.metrics)
    m = outcome.metrics
    print(
        f"finetune_instructions: val loss {m['val_loss_before']:.3f} -> {m['val_loss']:.3f}, "
        f"{m['tokens_seen']:,} tokens in {m['train_seconds']:.0f}s -> {args.out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
