"""Entity-level scores for token classification: seqeval's strict IOB2 mode (an entity is right only when its type,
start and end all are, and it starts with `B-`), precision / recall / F1 per type, micro and macro, with
bootstrap intervals over sentences.

The counts behind every figure (true positives, predicted and gold entities per type) are taken per sentence
once, so a resample of sentences is a sum of rows, not a re-extraction: 1,000 resamples of a test set take
milliseconds. The point figures equal `seqeval.metrics.classification_report(mode="strict", scheme=IOB2)`'s
(tested).
"""

from __future__ import annotations

import numpy as np

from afinar.data.tagging import entities
from afinar.evaluation.metrics import BOOTSTRAP_SAMPLES, resamples


def sentence_counts(gold: list[list[str]], predicted: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    """Counts per sentence and type, [:, t, 0] true positives, [:, t, 1] predicted, [:, t, 2] gold entities, and
    the types (sorted; every type gold or predicted), the entities extracted once."""
    gold_spans, predicted_spans = entities(gold), entities(predicted)
    types = sorted({span[2] for sentence in gold_spans + predicted_spans for span in sentence})
    index = {kind: i for i, kind in enumerate(types)}
    counts = np.zeros((len(gold), len(types), 3), dtype=np.int64)
    for row, (g, p) in enumerate(zip(gold_spans, predicted_spans)):
        for span in set(g) & set(p):
            counts[row, index[span[2]], 0] += 1
        for column, spans in ((1, p), (2, g)):
            for span in spans:
                counts[row, index[span[2]], column] += 1
    return counts, types


def _scores(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Micro and macro precision / recall / F1 from (..., types, 3) summed counts; macro averages the types that
    occur, gold or predicted (seqeval's average over its report's rows)."""
    tp, predicted, gold = totals[..., 0], totals[..., 1], totals[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(gold > 0, tp / np.maximum(gold, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        tp_all, predicted_all, gold_all = tp.sum(-1), predicted.sum(-1), gold.sum(-1)
        micro_p = np.where(predicted_all > 0, tp_all / np.maximum(predicted_all, 1), 0.0)
        micro_r = np.where(gold_all > 0, tp_all / np.maximum(gold_all, 1), 0.0)
        micro_f1 = np.where(micro_p + micro_r > 0, 2 * micro_p * micro_r / np.maximum(micro_p + micro_r, 1e-12), 0.0)
        present = (gold > 0) | (predicted > 0)
        macro_f1 = np.where(present.sum(-1) > 0, (f1 * present).sum(-1) / np.maximum(present.sum(-1), 1), 0.0)
    return {"precision": micro_p, "recall": micro_r, "f1": micro_f1, "macro_f1": macro_f1,
            "per_type": np.stack([precision, recall, f1], axis=-1)}


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 and macro F1, without intervals: what `Trainer` logs at each evaluation."""
    scores = _scores(sentence_counts(gold, predicted)[0].sum(axis=0))
    return {key: float(scores[key]) for key in ("precision", "recall", "f1", "macro_f1")}


def entity_report(gold: list[list[str]], predicted: list[list[str]], samples: int = BOOTSTRAP_SAMPLES,
                  seed: int = 0) -> dict:
    """Micro precision / recall / F1, macro F1 and per-type figures, with 95% percentile-bootstrap intervals over
    sentences (seeded); `n` sentences, `entities` gold entities; `rows` keeps each sentence's gold and predicted
    tags so two results on the same sentences can be compared."""
    counts, types = sentence_counts(gold, predicted)
    totals = counts.sum(axis=0)
    point = _scores(totals)
    report = {key: float(point[key]) for key in ("precision", "recall", "f1", "macro_f1")}
    report["per_type"] = {kind: {"precision": float(point["per_type"][t, 0]), "recall": float(point["per_type"][t, 1]),
                                 "f1": float(point["per_type"][t, 2]), "support": int(totals[t, 2]),
                                 "predicted": int(totals[t, 1])} for t, kind in enumerate(types)}
    report["n"] = len(gold)
    report["entities"] = int(totals[:, 2].sum())
    report["ci95"] = bootstrap_intervals(counts, samples, seed)
    report["rows"] = {"gold": gold, "predicted": predicted}
    return report


def bootstrap_intervals(counts: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, list]:
    """95% intervals of micro precision / recall / F1 and macro F1 over resampled sentences."""
    keys = ("precision", "recall", "f1", "macro_f1")
    if len(counts) == 0:
        return {key: [float("nan")] * 2 for key in keys}
    drawn = {key: [] for key in keys}
    for rows in resamples(len(counts), samples, seed):
        scores = _scores(counts[rows].sum(axis=1))
        for key in keys:
            drawn[key].append(scores[key])
    return {key: np.percentile(np.concatenate(values), [2.5, 97.5]).round(4).tolist() for key, values in drawn.items()}


def token_accuracy(gold: list[list[str]], predicted: list[list[str]]) -> float:
    pairs = [(g, p) for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)]
    return float(np.mean([g == p for g, p in pairs])) if pairs else float("nan")
