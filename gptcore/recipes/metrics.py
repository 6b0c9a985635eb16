"""Classification scores shared by the finetuned classifier and its scikit-learn baseline."""

from __future__ import annotations

from collections.abc import Sequence


def binary_scores(labels: Sequence[int], predictions: Sequence[int], positive: int = 1) -> dict[str, float]:
    """Accuracy, and precision, recall and F1 of the `positive` class (0.0 where undefined)."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    pairs = list(zip((int(y) for y in labels), (int(p) for p in predictions)))
    tp = sum(y == positive and p == positive for y, p in pairs)
    fp = sum(y != positive and p == positive for y, p in pairs)
    fn = sum(y == positive and p != positive for y, p in pairs)
    correct = sum(y == p for y, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def confusion_rows(labels: Sequence[int], predictions: Sequence[int], names: Sequence[str]) -> list[dict[str, str]]:
    """One {actual, predicted} row per example, by class name: the table DVC's confusion template reads."""
    return [{"actual": names[int(y)], "predicted": names[int(p)]} for y, p in zip(labels, predictions)]


def split_metrics(
    train_accuracy: float, val_accuracy: float, test_labels, test_predictions, test_loss: float
) -> dict[str, float]:
    """The flat metrics object of a classifier stage (same keys for the GPT classifier and the baseline)."""
    scores = binary_scores(test_labels, test_predictions)
    return {
        "train_accuracy": train_accuracy,
        "val_accuracy": val_accuracy,
        "test_accuracy": scores["accuracy"],
        "test_loss": test_loss,
        "test_precision": scores["precision"],
        "test_recall": scores["recall"],
        "test_f1": scores["f1"],
    }
