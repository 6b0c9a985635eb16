"""Stage generate_responses: answer the test instructions with the finetuned model.

Reads --model, --test (the test split) and params `generate:` plus the top-level `device`,
`precision`. Writes --out, the test entries each with `model_response` (the judge's input), and
--metrics (tokens per second). Finished batches are logged in --progress-dir, so an interrupted
run continues with the remaining entries.
"""

from pathlib import Path

from gptcore.arguments import ArgumentParser
from gptcore.atomic import write_json
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.recipes.instruct import generate_responses


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--model", required=True, help="the finetuned instruction model's weights file")
    parser.add_argument("--test", required=True, help="test split (JSON list of entries)")
    parser.add_argument("--out", required=True, help="responses JSON")
    parser.add_argument("--metrics", required=True, help="metrics JSON (tokens per second, batch size, precision)")
    parser.add_argument("--progress-dir", required=True, help="finished batches, so an interrupted run continues")
    args = parser.parse_args()

    params = load_params(args.params)
    outcome = generate_responses(
        args.model,
        args.test,
        params.generate,
        params.run,
        Path(args.progress_dir) / "partial.jsonl",
    )
    write_json(args.out, outcome.responses)
    write_json(args.metrics, outcome.metrics)
    outcome.log.finish(outcome.metrics)
    m = outcome.metrics
    print(
        f"generate_responses: {m['entries']} responses, {m['tokens_generated']:,} tokens at "
        f"{m['tokens_per_second']:.1f} tokens/s (batch {m['batch_size']}) -> {args.out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
