"""Stage finetune_instructions (Stage 4): finetune the foundation model to follow instructions.

Reads --model (models/<foundation>/model.safetensors, a language model), the train and validation
splits, params `instructions:` and the top-level `seed`, `device`, `precision`. Writes the finetuned
weights, metrics JSON (losses before and after), the loss plot table (CSV) and figure (PNG). Progress
is kept in --checkpoint-dir, so an interrupted run resumes where it stopped.
"""

from gptcore.atomic import write_json
from gptcore.arguments import ArgumentParser
from gptcore.entry import run_entry
from gptcore.device import is_main_process
from gptcore.instruct import finetune_instructions
from gptcore.params import load_params
from gptcore.plots import plot_curves, write_table
from gptcore.weights import save_model


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--model", required=True, help="foundation weights file")
    parser.add_argument("--train", required=True, help="train split (JSON list of entries)")
    parser.add_argument("--val", required=True, help="validation split (JSON list of entries)")
    parser.add_argument("--out", required=True, help="finetuned weights file")
    parser.add_argument("--metrics", required=True, help="metrics JSON (losses before and after, timing)")
    parser.add_argument("--plot-table", required=True, help="CSV: train and validation loss per evaluation")
    parser.add_argument("--plot-png", required=True, help="figure of the loss table")
    parser.add_argument("--checkpoint-dir", required=True, help="resumable progress (kept between runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    outcome = finetune_instructions(
        args.model, args.train, args.val, params.instructions, params.run, args.checkpoint_dir,
    )
    if not is_main_process():  # under torchrun, rank 0 writes the outputs
        return
    save_model(outcome.model, args.out)
    write_json(args.metrics, outcome.metrics)
    write_table(args.plot_table, outcome.history)
    plot_curves(args.plot_png, outcome.history, ["train_loss", "val_loss"], x="tokens_seen", title="Stage 4 instruction finetuning")
    outcome.checkpoint.finish(outcome.metrics)
    m = outcome.metrics
    print(f"finetune_instructions: val loss {m['val_loss_before']:.3f} -> {m['val_loss']:.3f}, "
          f"{m['tokens_seen']:,} tokens in {m['train_seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
