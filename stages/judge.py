"""Stage judge (Stage 4b): score the instruction model's responses with an LLM judge served by Ollama.

Reads params `judge:` and the responses file (a JSON list of entries with instruction, input, output
and model_response). Writes every judgement to the scores file (JSON lines, kept between runs, so a
re-run asks only what is missing or failed), the metrics JSON (average score with its 95% bootstrap
interval), the per-entry score table (CSV, for `dvc plots diff`) and the score histogram (CSV and PNG).
Needs a running Ollama server with the judge model: `ollama serve`, `ollama pull llama3.1:8b`.
See docs/judge.md.
"""

from gptcore.arguments import ArgumentParser
from gptcore.atomic import write_json
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.recipes.judge.absolute import judge_responses
from gptcore.training.plots import bar_figure, save_png, write_table


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--responses", required=True, help="responses JSON (the test entries with model_response)")
    parser.add_argument("--scores", required=True, help="per-entry judgements (JSON lines), kept between runs")
    parser.add_argument("--metrics", required=True, help="metrics JSON (average score, its 95%% interval, counts)")
    parser.add_argument("--scores-table", required=True, help="CSV: one row per entry (score and form)")
    parser.add_argument("--histogram-table", required=True, help="CSV: entries per bin of ten")
    parser.add_argument("--histogram-png", required=True, help="figure of the score histogram")
    args = parser.parse_args()

    params = load_params(args.params).judge
    outcome = judge_responses(args.responses, args.scores, params)
    write_json(args.metrics, outcome.metrics)
    write_table(args.scores_table, outcome.table, columns=["entry", "instruction", "score", "form"])
    write_table(args.histogram_table, outcome.histogram, columns=["bin", "low", "count"])
    histogram = bar_figure(
        [row["bin"] for row in outcome.histogram],
        [row["count"] for row in outcome.histogram],
        title=f"Judge scores by {params.model}",
        xlabel="score (points out of 100, bins of ten)",
        ylabel="entries (count)",
    )
    save_png(histogram, args.histogram_png)
    m = outcome.metrics
    average = (
        "n/a"
        if m["average_score"] is None
        else (f"{m['average_score']:.2f} (95% CI {m['average_score_ci95_low']:.2f}-{m['average_score_ci95_high']:.2f})")
    )
    print(
        f"judge: average score {average} over {m['n_scored']} entries, {m['n_failed']} failed, "
        f"{m['n_truncated']} possibly truncated ({m['judge_model']}, Ollama {m['judge_version']}) -> {args.metrics}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
