"""Stage finetune_instructions (Stage 4): finetune the foundation model to follow instructions.

Reads --model (models/<foundation>/model.safetensors, a language model), the train and validation
splits, params `instructions:` and the top-level `seed`, `device`, `precision`. Writes the finetuned
weights (under `method: lora` the adapters merged into them, and the adapter file beside them), and
through DVCLive (gptcore/training/live.py) the metrics JSON (losses before and after), rewritten
at every evaluation while it trains, and the plots folder: one table per logged value and the loss
figure. Progress is kept in --progress-dir, so an interrupted run resumes where it stopped.
"""

from gptcore.arguments import ArgumentParser
from gptcore.device import is_main_process
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.prompt import PROMPT_FORMAT, PROMPT_FORMAT_KEY
from gptcore.recipes.adapters import write_adapter, write_merged_lm
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
    parser.add_argument("--out", required=True, help="finetuned weights file (adapters merged, under LoRA)")
    parser.add_argument("--adapter-out", required=True, help="the LoRA adapter file, written with method: lora")
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
        format_tag = {PROMPT_FORMAT_KEY: PROMPT_FORMAT}  # exports add the chat template
        if outcome.lora is None:
            save_model(outcome.model, args.out, extra=format_tag)
        else:  # the adapter, then the merged weights made from the foundation's file
            write_adapter(outcome.model, outcome.lora, args.model, args.adapter_out, extra=format_tag)
            write_merged_lm(args.model, args.adapter_out, args.out)
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
