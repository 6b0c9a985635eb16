"""The reference row for Stage 3: TF-IDF features + logistic regression (scikit-learn) on the same splits."""

from __future__ import annotations

import pandas as pd

from gptcore.data.sms import LABELS
from gptcore.recipes.metrics import confusion_rows, split_metrics


def fit_baseline(
    splits: dict[str, pd.DataFrame], max_iter: int = 1000
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Fit on splits["train"]; return the metrics (the GPT classifier's keys) and the test confusion rows.

    Deterministic: TfidfVectorizer's defaults (word unigrams, lower-cased) and the lbfgs solver.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer  # imported here: a heavy import
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    vectorizer = TfidfVectorizer()
    features = {"train": vectorizer.fit_transform(splits["train"]["Text"])}
    features |= {name: vectorizer.transform(splits[name]["Text"]) for name in ("validation", "test")}
    model = LogisticRegression(max_iter=max_iter).fit(features["train"], splits["train"]["Label"])
    accuracy = {name: float((model.predict(features[name]) == splits[name]["Label"]).mean()) for name in splits}
    test_labels = splits["test"]["Label"].tolist()
    test_predictions = model.predict(features["test"]).tolist()
    test_loss = float(log_loss(test_labels, model.predict_proba(features["test"]), labels=list(range(len(LABELS)))))
    metrics = split_metrics(accuracy["train"], accuracy["validation"], test_labels, test_predictions, test_loss)
    return metrics, confusion_rows(test_labels, test_predictions, LABELS)
