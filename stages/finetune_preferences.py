"""Stage finetune_preferences: DPO from the Stage 4 model on chosen/rejected pairs (the book's ch. 7 bonus).

Reads --model (the Stage 4 weights, also DPO's reference), --data-dir (prepare_preferences' splits with
the reference log-probs), params `preferences:` and the top-level `seed`, `device`, `precision`.
Writes the tuned weights (under `method: lora` the adapters merged into them, and the adapter file
beside them), and through DVCLive the metrics JSON (DPO loss, rewards, margin and reward accuracy of
train, validation and at the end the test split), rewritten at every evaluation while it trains, and
the plots folder: one table per logged value, the loss, margin and chosen log-likelihood figures.
Progress is kept in --progress-dir, so an interrupted run resumes where it stopped.
"""

from gptcore.arguments import ArgumentParser
from gptcore.device import is_main_process
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.recipes.adapters import write_adapter, write_merged_lm
from gptcore.recipes.preferences import EVALUATED, finetune_preferences
from gptcore.training.live import TrainingLog
from gptcore.training.plots import line_figure
from gptcore.weights import save_model

LOGGED = ["epoch", "tokens_seen"] + [f"{split}_{key}" for split in ("train", "val") for key in EVALUATED]
FIGURES = {  # image name: (values, title, y label)
    "loss.png": (["train_loss", "val_loss"], "DPO loss", "DPO loss (nats per pair; ln 2 = 0.693 at the start)"),
    "margin.png": (["train_margin", "val_margin"], "reward margin", "chosen - rejected reward (beta x nats)"),
    "chosen_logprob.png": (
        ["train_chosen_logprob", "val_chosen_logprob"],
        "chosen responses' log-likelihood",
        "mean log-probability per token (nats)",
    ),
}


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--model", required=True, help="the Stage 4 weights file (the start and the reference)")
    parser.add_argument("--data-dir", required=True, help="prepare_preferences' folder (splits + reference.json)")
    parser.add_argument("--out", required=True, help="tuned weights file (adapters merged, under LoRA)")
    parser.add_argument("--adapter-out", required=True, help="the LoRA adapter file, written with method: lora")
    parser.add_argument("--metrics", required=True, help="metrics JSON (live while training; then the test split's)")
    parser.add_argument("--plots", required=True, help="plots folder: metrics/<value>.tsv per evaluation, images/")
    parser.add_argument("--progress-dir", required=True, help="resumable progress (kept between runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    with TrainingLog(args.metrics, args.plots, LOGGED) as log:
        outcome = finetune_preferences(
            args.model, args.data_dir, params.preferences, params.run, args.progress_dir, report=log.update
        )
        if not is_main_process():  # under torchrun, rank 0 writes the outputs
            return
        if outcome.lora is None:
            save_model(outcome.model, args.out)
        else:  # the adapter, then the merged weights made from the Stage 4 model's file
            write_adapter(outcome.model, outcome.lora, args.model, args.adapter_out)
            write_merged_lm(args.model, args.adapter_out, args.out)
        images = {
            name: line_figure(
                outcome.history,
                "tokens_seen",
                keys,
                title=f"Preference tuning (DPO): {title}",
                xlabel="tokens seen (chosen + rejected, padding included)",
                ylabel=ylabel,
            )
            for name, (keys, title, ylabel) in FIGURES.items()
        }
        log.finish(outcome.metrics, images=images)
    outcome.progress.finish(outcome.metrics)
    m = outcome.metrics
    print(
        f"finetune_preferences: val DPO loss {m['val_loss_before']:.3f} -> {m['val_loss']:.3f}, val margin "
        f"{m['val_margin']:.3f}, test reward accuracy {m['test_accuracy']:.3f} in {m['train_seconds']:.0f}s -> {args.out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
