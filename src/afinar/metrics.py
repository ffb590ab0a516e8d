"""Classification metrics: the two headline numbers for model selection and the full picture for reports."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


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
            "majority_baseline": float(counts.max() / max(counts.sum(), 1)),
            "n": int(len(labels)),
            "per_class": per_class,
            "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
            "labels": list(label_names)}


def logits_to_predictions(logits, labels):
    """`preprocess_logits_for_metrics`: keep one id per row, so evaluation memory does not grow with logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def trainer_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for `Trainer`, on the ids left by `logits_to_predictions`."""
    return headline(eval_prediction.label_ids, eval_prediction.predictions)
