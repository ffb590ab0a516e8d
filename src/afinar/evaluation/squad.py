"""SQuAD v1.1's official answer scores, and the no-training baseline question answering is measured against.

`normalize_answer`, `exact_match` and `token_f1` are the official evaluation script's (lowercase, punctuation and
the articles a/an/the removed, whitespace collapsed; each prediction scored against every gold answer, the best
kept). Figures are means over questions, as fractions (0.45 is SQuAD's "45.0"), with 95% percentile-bootstrap
intervals over questions; `rows` keeps each question's scores so two results on the same questions can be compared
paired.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

from afinar.evaluation.metrics import BOOTSTRAP_SAMPLES, mean_interval

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(predicted) & Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: list[str]) -> float:
    return max(metric(prediction, gold) for gold in golds)


def question_scores(predictions: list[str], golds: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact match and F1 of each prediction against its gold answers (the best of them), in [0, 1]."""
    em = np.array([best_over_golds(exact_match, p, g) for p, g in zip(predictions, golds)], dtype=float)
    f1 = np.array([best_over_golds(token_f1, p, g) for p, g in zip(predictions, golds)], dtype=float)
    return em, f1


def answer_report(predictions: list[str], golds: list[list[str]], ids: list[str]) -> dict:
    """Exact match and F1 (fractions) with intervals; `n` questions; per-question rows."""
    em, f1 = question_scores(predictions, golds)
    return {"exact_match": float(em.mean()) if len(em) else float("nan"),
            "f1": float(f1.mean()) if len(f1) else float("nan"),
            "ci95": {"exact_match": mean_interval(em), "f1": mean_interval(f1)},
            "n": len(predictions),
            "rows": {"id": ids, "predicted": predictions, "exact_match": em.tolist(), "f1": f1.tolist()}}


def sentences(context: str) -> list[str]:
    return [s for s in SENTENCE_END.split(context) if s.strip()]


def overlap_sentence(question: str, context: str) -> str:
    """The context sentence sharing the most normalised words with the question (the first on ties): what a
    reader who only matches words would answer, with no training."""
    asked = set(normalize_answer(question).split())
    candidates = sentences(context) or [context]
    return max(candidates, key=lambda s: len(asked & set(normalize_answer(s).split())))


def paired_difference(report_a: dict, report_b: dict, key: str = "f1", samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> dict:
    """B minus A on the same questions, with its 95% paired-bootstrap interval."""
    if report_a["rows"]["id"] != report_b["rows"]["id"]:
        raise ValueError("a paired comparison needs the same questions in the same order")
    difference = np.asarray(report_b["rows"][key]) - np.asarray(report_a["rows"][key])
    return {"delta": float(difference.mean()), "ci95": mean_interval(difference, samples, seed)}
