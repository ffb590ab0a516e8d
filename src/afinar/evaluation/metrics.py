"""Classification metrics: the two headline numbers for model selection and the full picture for reports."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

BOOTSTRAP_SAMPLES = 1000


def headline(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1: what `Trainer` logs at each evaluation and selects the best checkpoint by."""
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0))}


def classification_report(labels: np.ndarray, predictions: np.ndarray, label_names: list[str]) -> dict:
    """Headline numbers, per-class precision/recall/F1/support and the confusion matrix (rows = true)."""
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(label_names)}
    counts = np.bincount(np.asarray(labels), minlength=len(label_names))
    return {**headline(labels, predictions),
            "ci95": bootstrap_interval(np.asarray(labels), np.asarray(predictions), len(label_names)),
            "majority_baseline": float(counts.max() / max(counts.sum(), 1)),
            "n": int(len(labels)),
            "per_class": per_class,
            "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
            "labels": list(label_names)}


def bootstrap_interval(labels: np.ndarray, predictions: np.ndarray, classes: int, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of accuracy and macro-F1: `samples` resamples of the rows with
    replacement (seeded, so a report is reproducible), each scored from its confusion counts."""
    n = len(labels)
    if n == 0:
        return {"accuracy": [float("nan")] * 2, "macro_f1": [float("nan")] * 2}
    rng = np.random.default_rng(seed)
    codes = labels * classes + predictions
    confusion = np.stack([np.bincount(codes[rng.integers(0, n, n)], minlength=classes * classes)
                          for _ in range(samples)]).reshape(samples, classes, classes)  # rows = true
    right = np.trace(confusion, axis1=1, axis2=2)
    true_positive = np.diagonal(confusion, axis1=1, axis2=2)
    predicted, actual = confusion.sum(axis=1), confusion.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(predicted + actual > 0, 2 * true_positive / (predicted + actual), 0.0)
    return {"accuracy": np.percentile(right / n, [2.5, 97.5]).round(4).tolist(),
            "macro_f1": np.percentile(f1.mean(axis=1), [2.5, 97.5]).round(4).tolist()}


def with_interval(report: dict, key: str, digits: int = 4) -> str:
    """`0.7982 [0.7850, 0.8110]`: a metric and its bootstrap 95% interval when the report has one."""
    value = f"{report[key]:.{digits}f}"
    interval = (report.get("ci95") or {}).get(key)
    return value + (f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else "")


def logits_to_predictions(logits, labels):
    """`preprocess_logits_for_metrics`: keep one id per row, so evaluation memory does not grow with logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def trainer_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for `Trainer`, on the ids left by `logits_to_predictions`."""
    return headline(eval_prediction.label_ids, eval_prediction.predictions)
