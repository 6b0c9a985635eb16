"""The judge's statistics: the bootstrap interval of the average score, and the per-entry and histogram plot tables."""

from __future__ import annotations

from collections.abc import Sequence

# Resamples of the percentile bootstrap. Efron & Tibshirani (1993), "An Introduction to the Bootstrap",
# ch. 19, ask for at least 1,000 for percentile intervals; with 10,000 the Monte Carlo error of an end
# point is about 0.07 points for 110 scores of standard deviation 25 (sqrt(p(1-p)/B) / density).
BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_interval(
    scores: Sequence[float], seed: int, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
) -> tuple[float, float]:
    """The percentile bootstrap confidence interval of the mean score (Efron & Tibshirani 1993, ch. 13).

    Draws `resamples` samples of len(scores) with replacement from a numpy Generator seeded with
    `seed` (so the same scores always give the same interval), and returns the (1 - level) / 2 and
    (1 + level) / 2 quantiles of their means (numpy's default linear interpolation).
    """
    import numpy as np

    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no scores to resample")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)  # [resamples]
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def score_rows(entries: Sequence[dict], records: Sequence[dict]) -> list[dict]:
    """The per-entry plot table: entry index, the instruction's first words, score and the form that
    stated it ("failed" if none did), so `dvc plots diff` compares runs entry by entry.

    A failed entry's score is NaN, which Vega leaves out of the scatter; a blank would be drawn as 0.
    """
    rows = []
    for entry, record in zip(entries, records):
        words = " ".join(entry["instruction"].split())
        scored = record["status"] == "scored"
        rows.append(
            {
                "entry": record["index"],
                "instruction": words[:60] + ("…" if len(words) > 60 else ""),
                "score": record["score"] if scored else "NaN",
                "form": record["form"] if scored else "failed",
            }
        )
    return rows


HISTOGRAM_BINS = [(low, low + 9) for low in range(0, 90, 10)] + [(90, 100)]


def histogram_rows(scores: Sequence[int]) -> list[dict]:
    """Counts of scores in bins of ten (the last bin holds 90-100): the plot table."""
    return [
        {"bin": f"{low}-{high}", "low": low, "count": sum(low <= s <= high for s in scores)}
        for low, high in HISTOGRAM_BINS
    ]
