"""Stage pretrain (Stage 1): train GPTModel from scratch on the corpus.

Reads params `pretrain:` and the top-level `seed`, `device`, `precision`. Writes the weights file,
metrics JSON, the loss plot table (CSV) and figure (PNG), and a sample continuation. Progress is kept
in --checkpoint-dir, so an interrupted run resumes where it stopped. dvc.yaml starts it with glibc's
allocator set to keep freed memory (every step has the same shapes; gptcore/memory.py).
"""

from gptcore.atomic import write_json, write_text
from gptcore.arguments import ArgumentParser
from gptcore.entry import run_entry
from gptcore.device import is_main_process
from gptcore.params import load_params
from gptcore.plots import plot_curves, write_table
from gptcore.pretrain import pretrain
from gptcore.weights import save_model


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--corpus", required=True, help="the training text (UTF-8)")
    parser.add_argument("--out", required=True, help="weights file")
    parser.add_argument("--metrics", required=True, help="metrics JSON (final losses, tokens seen, timing)")
    parser.add_argument("--plot-table", required=True, help="CSV: train and validation loss per evaluation")
    parser.add_argument("--plot-png", required=True, help="figure of the loss table")
    parser.add_argument("--sample", required=True, help="text file: a continuation of sample_prompt after training")
    parser.add_argument("--checkpoint-dir", required=True, help="resumable progress (kept between runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    outcome = pretrain(args.corpus, params.pretrain, params.run, args.checkpoint_dir)
    if not is_main_process():  # under torchrun, rank 0 writes the outputs
        return
    save_model(outcome.model, args.out)
    write_json(args.metrics, outcome.metrics)
    write_table(args.plot_table, outcome.result.history)
    plot_curves(args.plot_png, outcome.result.history, ["train_loss", "val_loss"], x="tokens_seen", title="Stage 1 pretraining")
    write_text(args.sample, outcome.sample + "\n")
    outcome.checkpoint.finish(outcome.metrics)
    m = outcome.metrics
    print(f"pretrain: train loss {m['train_loss']:.3f}, val loss {m['val_loss']:.3f}, "
          f"{m['tokens_seen']:,} tokens in {m['train_seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
