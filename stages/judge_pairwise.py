"""Stage judge_pairwise: the Stage 4 model's responses against the preference-tuned model's, compared by
an LLM judge served by Ollama, in both orders; a verdict counts only when the two orders agree.

Reads --a and --b (responses files: the same test entries, each with model_response), params `judge:`
(server, judge model, options) and `judge_pairwise:` (the criterion). Writes every judgement to the
verdicts file (JSON lines, kept between runs, so a re-run asks only what is missing or failed), the
metrics JSON (win rate of B over A with its 95% bootstrap interval, tie rate, position consistency)
and the per-entry verdict table (CSV, for `dvc plots diff`). See docs/preferences.md.
"""

from gptcore.arguments import ArgumentParser
from gptcore.atomic import write_json
from gptcore.entry import run_entry
from gptcore.params.load import load_params
from gptcore.recipes.judge.pairwise import judge_pairwise
from gptcore.training.plots import write_table


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file; validated whole before any work")
    parser.add_argument("--a", required=True, help="responses of model A (the Stage 4 model)")
    parser.add_argument("--b", required=True, help="responses of model B (the preference-tuned model)")
    parser.add_argument("--verdicts", required=True, help="per-order judgements (JSON lines), kept between runs")
    parser.add_argument("--metrics", required=True, help="metrics JSON (win rate and its 95%% interval, tie rate, ...)")
    parser.add_argument("--table", required=True, help="CSV: one row per entry (each order's verdict, the outcome)")
    args = parser.parse_args()

    params = load_params(args.params)
    rows, m = judge_pairwise(args.a, args.b, args.verdicts, params.judge, params.judge_pairwise.criterion)
    write_json(args.metrics, m)
    write_table(args.table, rows, columns=["entry", "instruction", "ab", "ba", "outcome", "score"])
    win = (
        "n/a"
        if m["win_rate"] is None
        else f"{m['win_rate']:.3f} (95% CI {m['win_rate_ci95_low']:.3f}-{m['win_rate_ci95_high']:.3f})"
    )
    print(
        f"judge_pairwise: B's win rate {win}, tie rate {m['tie_rate']}, position consistency "
        f"{m['position_consistency']} over {m['n_judged']} entries, {m['n_failed']} failed ({m['criterion']}, "
        f"{m['judge_model']}) -> {args.metrics}"
    )


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
