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
    """Headline numbers, per-class precision/recall/F1/support, the confusion matrix (rows = true), and the
    rows' gold labels and predictions, so two results on the same rows can be compared paired (`paired_difference`)."""
    labels, predictions = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(label_names)}
    counts = np.bincount(labels, minlength=len(label_names))
    return {**headline(labels, predictions),
            "ci95": bootstrap_interval(labels, predictions, len(label_names)),
            "majority_baseline": float(counts.max() / max(counts.sum(), 1)),  # the diagnosis' bar (`baseline_of`)
            "n": int(len(labels)),
            "per_class": per_class,
            "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
            "labels": list(label_names),
            "rows": {"gold": labels.tolist(), "predicted": predictions.tolist()}}


RESAMPLE_CHUNK = 50  # resamples drawn at once: memory is chunk x rows indices, not samples x rows


def resamples(n: int, samples: int, seed: int):
    """Row-index matrices (at most `RESAMPLE_CHUNK` resamples of `n` rows each) from one seeded generator, so a
    bootstrap over 400,000 rows does not hold 1,000 x 400,000 indices at once."""
    rng = np.random.default_rng(seed)
    for start in range(0, samples, RESAMPLE_CHUNK):
        yield rng.integers(0, n, (min(RESAMPLE_CHUNK, samples - start), n))


def _resampled_scores(labels: np.ndarray, predictions: np.ndarray, classes: int, rows: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of each resample (one per row of `rows`, a matrix of row indices), scored from its
    confusion counts. Macro-F1 averages over the classes that occur in that resample, gold or predicted: the
    set sklearn's `f1_score(average="macro")` averages over, so the point and its resamples measure the same
    thing (a class the rows never mention is not a zero dragging the average down)."""
    samples, n = rows.shape
    codes = labels * classes + predictions
    confusion = np.stack([np.bincount(codes[r], minlength=classes * classes) for r in rows]
                         ).reshape(samples, classes, classes)  # rows = true
    right = np.trace(confusion, axis1=1, axis2=2)
    true_positive = np.diagonal(confusion, axis1=1, axis2=2)
    predicted, actual = confusion.sum(axis=1), confusion.sum(axis=2)
    present = predicted + actual > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * true_positive / np.maximum(predicted + actual, 1), 0.0)
    return right / n, f1.sum(axis=1) / present.sum(axis=1)


def mean_interval(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of a mean over rows (seeded): per-row scores such as an answer's F1."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return [float("nan")] * 2
    means = np.concatenate([values[rows].mean(axis=1) for rows in resamples(len(values), samples, seed)])
    return np.percentile(means, [2.5, 97.5]).round(4).tolist()


def bootstrap_interval(labels: np.ndarray, predictions: np.ndarray, classes: int, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of accuracy and macro-F1: `samples` resamples of the rows with
    replacement (seeded, so a report is reproducible), each scored as the point is (`_resampled_scores`)."""
    labels, predictions = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    n = len(labels)
    if n == 0:
        return {"accuracy": [float("nan")] * 2, "macro_f1": [float("nan")] * 2}
    scored = [_resampled_scores(labels, predictions, classes, rows) for rows in resamples(n, samples, seed)]
    accuracy, macro_f1 = (np.concatenate(part) for part in zip(*scored))
    return {"accuracy": np.percentile(accuracy, [2.5, 97.5]).round(4).tolist(),
            "macro_f1": np.percentile(macro_f1, [2.5, 97.5]).round(4).tolist()}


def paired_difference(labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray, classes: int,
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, dict]:
    """B minus A on the same rows, for accuracy and macro-F1: the difference and its 95% paired-bootstrap
    interval (each resample of rows scores both, so what the rows share cancels out). Two results on the same
    rows differ within noise only when that interval contains 0: comparing their separate intervals instead
    calls real 1-2 point differences noise."""
    labels = np.asarray(labels, dtype=int)
    a, b = np.asarray(predictions_a, dtype=int), np.asarray(predictions_b, dtype=int)
    if not len(labels) == len(a) == len(b) or not len(labels):
        raise ValueError(f"a paired comparison needs the same rows: {len(labels)} gold, {len(a)} and {len(b)} "
                         f"predictions")
    point_a, point_b = headline(labels, a), headline(labels, b)
    differences = []  # per chunk: (accuracy, macro-F1) of B minus A on the same resampled rows
    for rows in resamples(len(labels), samples, seed):
        scores_a, scores_b = _resampled_scores(labels, a, classes, rows), _resampled_scores(labels, b, classes, rows)
        differences.append([scores_b[k] - scores_a[k] for k in range(2)])
    out = {}
    for index, key in enumerate(("accuracy", "macro_f1")):
        difference = np.concatenate([chunk[index] for chunk in differences])
        interval = np.percentile(difference, [2.5, 97.5]).round(4).tolist()
        out[key] = {"delta": point_b[key] - point_a[key], "ci95": interval,
                    "within_noise": bool(interval[0] <= 0 <= interval[1])}
    return out


def paired_rows(report_a: dict | None, report_b: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Gold labels and both predictions when two reports scored the same rows (the same gold labels in the same
    order, the same label names), else None: then only their separate intervals can be shown."""
    rows_a, rows_b = (report_a or {}).get("rows"), (report_b or {}).get("rows")
    if not rows_a or not rows_b or not rows_a["gold"] or rows_a["gold"] != rows_b["gold"] \
            or report_a.get("labels") != report_b.get("labels"):
        return None
    return np.asarray(rows_a["gold"]), np.asarray(rows_a["predicted"]), np.asarray(rows_b["predicted"])


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
