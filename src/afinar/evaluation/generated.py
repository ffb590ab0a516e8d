"""Scores of generated answers against references (`sft.metrics`): ROUGE-1/2/L F-measures (the `rouge-score`
package, stemmed, each generation against every reference, the best kept: `score_multi`) and SQuAD's exact match
and F1 (`evaluation.squad`). Each figure is a mean over rows with a 95% bootstrap interval over rows; two models'
generations for the same prompts compare paired (`paired_gain`).
"""

from __future__ import annotations

import numpy as np

from afinar.evaluation import squad
from afinar.evaluation.metrics import mean_interval

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
METRIC_KEYS = {"rouge": ROUGE_KEYS, "squad": ("exact_match", "f1")}


def row_scores(metric: str, generations: list[str], references: list[list[str]]) -> dict[str, np.ndarray]:
    """Per-row scores in [0, 1] of each key of `metric` (rouge | squad)."""
    if metric == "rouge":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
        scored = [scorer.score_multi(refs, generated) for generated, refs in zip(generations, references)]
        return {key: np.array([s[key].fmeasure for s in scored], dtype=float) for key in ROUGE_KEYS}
    em, f1 = squad.question_scores(generations, references)
    return {"exact_match": em, "f1": f1}


def generation_report(metric: str, generations: list[str], references: list[list[str]]) -> dict:
    """Means with 95% bootstrap intervals, `n` rows, and the per-row scores (for paired comparisons)."""
    rows = row_scores(metric, generations, references)
    return {**{key: float(values.mean()) if len(values) else float("nan") for key, values in rows.items()},
            "ci95": {key: mean_interval(values) for key, values in rows.items()}, "n": len(generations),
            "rows": {key: values.tolist() for key, values in rows.items()}}


def paired_gain(before: dict, after: dict) -> dict[str, dict]:
    """`after` minus `before` on the same rows, per key: the difference and its 95% paired-bootstrap interval."""
    out = {}
    for key, values in after["rows"].items():
        difference = np.asarray(values) - np.asarray(before["rows"][key])
        out[key] = {"delta": float(difference.mean()), "ci95": mean_interval(difference)}
    return out
