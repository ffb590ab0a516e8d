"""Suspect labels: training rows whose label a model trained without them disagrees with.

Out-of-fold predictions of a cheap model (frozen sentence-encoder features + logistic regression, k stratified
folds: each row is predicted by a model that never saw it) give every row the probability of its own label;
rows are ranked from the least probable up. That ordering is cleanlab's `self_confidence` ranking; what
cleanlab's `find_label_issues` adds on top is a per-class threshold that decides how many rows to call issues,
which afinar leaves to the user (the CSV is ranked; fix from the top). Output: a CSV of row, text, given label,
suggested label and the model's confidence in the suggestion, for fixing the file.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afinar import data as data_lib
from afinar.config import Config
from afinar.errors import AfinarError

log = logging.getLogger(__name__)


@dataclass
class Suspect:
    row: int  # position in the training split as read (before checks drop anything), 0-based
    text: str
    given: str
    suggested: str
    confidence: float  # out-of-fold probability of the suggested label
    given_probability: float  # ... and of the given one; the ranking key (lowest first)


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """P(class | row) for every row from a logistic regression fitted on the other folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    smallest = np.bincount(labels).min()
    if smallest < folds:
        raise AfinarError(f"suspect labels need at least {folds} training rows per class (one has {smallest})")
    model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    return cross_val_predict(model, features, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                             method="predict_proba")


def rank_suspects(texts: list[str], labels: np.ndarray, probabilities: np.ndarray, label_names: list[str]
                  ) -> list[Suspect]:
    """Rows where the suggestion differs from the given label, least probable given label first."""
    given = probabilities[np.arange(len(labels)), labels]
    suggested = probabilities.argmax(axis=1)
    order = np.argsort(given, kind="stable")
    return [Suspect(int(i), texts[i], label_names[labels[i]], label_names[suggested[i]],
                    float(probabilities[i, suggested[i]]), float(given[i]))
            for i in order if suggested[i] != labels[i]]


def find_suspects(config: Config, folds: int = 5) -> list[Suspect]:
    """The configured training split's suspect labels (from `compare.encoder` features)."""
    from afinar.strategies import Encoder

    splits = data_lib.read_splits(config.data, with_test=False)
    if data_lib.has_pairs(splits.train):
        raise AfinarError("suspect labels read one text per row; these data are sentence pairs")
    texts, labels = list(splits.train["text"]), np.asarray(splits.train["label"])
    encoder = Encoder(config.compare.encoder, config.data.max_length, config.compare.encode_batch)
    log.info("encoding %d training texts with %s for %d-fold out-of-fold predictions", len(texts),
             config.compare.encoder, folds)
    probabilities = out_of_fold_probabilities(encoder.encode(texts), labels, folds, config.train.seed)
    return rank_suspects(texts, labels, probabilities, splits.label_names)


def write_suspects(suspects: list[Suspect], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "text", "given_label", "suggested_label", "confidence", "given_label_probability"])
        for s in suspects:
            writer.writerow([s.row, s.text, s.given, s.suggested, f"{s.confidence:.4f}", f"{s.given_probability:.4f}"])
    return path
