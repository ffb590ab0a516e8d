"""Suspect labels: training rows whose label a model disagrees with, ranked for a person to fix.

Two sources of the probability of each row's own label, both ranked from the least probable up:
- before training (`afinar check --suspects`): out-of-fold predictions of a cheap model (frozen sentence-encoder
  features + logistic regression, k stratified folds: each row is predicted by a model that never saw it);
- after training (every classification run, `checks.suspects`): the fine-tuned model's own probabilities on its
  training rows. It saw those rows, but the best checkpoint of an early-stopped run has learnt the pattern far
  better than it has memorised a wrong label, so a mislabelled row still stands out.
That ordering is cleanlab's `self_confidence` ranking; what cleanlab's `find_label_issues` adds on top is a
per-class threshold that decides how many rows to call issues, which afinar leaves to the user (the CSV is
ranked; fix from the top). Output: a CSV of row, text, given label, suggested label and the model's confidence in
the suggestion.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from afinar.core.config import Config, DataArgs
from afinar.core.errors import AfinarError
from afinar.data import sources as data_lib

log = logging.getLogger(__name__)


SUSPECTS_FILE = "suspects.csv"  # in a run folder: the ranking after training


@dataclass
class Suspect:
    row: int | None  # the record's 0-based position among the train file's data rows (header not counted)
    text: str
    given: str
    suggested: str
    confidence: float  # the model's probability of the suggested label
    given_probability: float  # ... and of the given one; the ranking key (lowest first)
    text_pair: str | None = None  # sentence pairs: the second text


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


def rank_suspects(texts: list[data_lib.Input], labels: np.ndarray, probabilities: np.ndarray,
                  label_names: list[str], rows: list[int | None] | None = None) -> list[Suspect]:
    """Every row, least probable given label first; `rows` are the file positions of `texts` (default: their own
    positions). Not only the rows the model disagrees with: a well-fitted model agrees with most rows, and an
    unsure agreement (the given label at 0.4 against 0.35 and 0.25) is as worth a look as a near miss."""
    given = probabilities[np.arange(len(labels)), labels]
    suggested = probabilities.argmax(axis=1)
    rows = list(range(len(texts))) if rows is None else rows
    ranked = []
    for i in np.argsort(given, kind="stable"):
        text, pair = texts[i] if isinstance(texts[i], tuple) else (texts[i], None)
        ranked.append(Suspect(rows[i], text, label_names[labels[i]], label_names[suggested[i]],
                              float(probabilities[i, suggested[i]]), float(given[i]), pair))
    return ranked


def disagreeing(suspects: list[Suspect]) -> list[Suspect]:
    """The ranked rows whose suggested label is not the given one."""
    return [s for s in suspects if s.suggested != s.given]


def find_suspects(config: Config, folds: int = 5) -> list[Suspect]:
    """The configured training split's suspect labels (from `compare.encoder` features of each text or pair)."""
    from afinar.inference.encoder import Encoder

    splits = data_lib.read_splits(config.data, with_test=False)
    texts, labels = data_lib.inputs(splits.train), np.asarray(splits.train["label"])
    encoder = Encoder(config.compare.encoder, config.data.max_length, config.compare.encode_batch)
    log.info("encoding %d training texts with %s for %d-fold out-of-fold predictions", len(texts),
             config.compare.encoder, folds)
    probabilities = out_of_fold_probabilities(encoder.features(texts), labels, folds, config.train.seed)
    return rank_suspects(texts, labels, probabilities, splits.label_names)


def file_rows(args: DataArgs, train: Dataset) -> list[int | None]:
    """Each row of a prepared (carved, subsetted, checked) training split as its record in the local train file
    as read: the 0-based position among the file's data rows, as pandas numbers them (a JSONL record's line is
    row + 1; a CSV's is row + 2 after the header when no field spans lines). None for a row not found there, and
    for a hub dataset (not downloaded twice; its text identifies the row)."""
    if data_lib.split_files(args, with_test=False) is None:
        return [None] * len(train)
    first: dict = {}
    for position, text in enumerate(data_lib.inputs(data_lib.read_splits(args, with_test=False).train)):
        first.setdefault(text, position)
    return [first.get(text) for text in data_lib.inputs(train)]


def trained_model_suspects(model_dir: str | Path, config: Config, train: Dataset, label_names: list[str],
                           bf16: bool) -> list[Suspect]:
    """The training rows ranked by the saved model's probability of their own label (see the module's note)."""
    import torch

    from afinar.inference.predictors import Classifier

    classifier = Classifier(model_dir, config.data.max_length, config.model.allow_pickle, bf16,
                            "cuda" if torch.cuda.is_available() else "cpu")
    if classifier.labels != label_names:
        raise AfinarError(f"{model_dir}: the model's labels {classifier.labels} are not the data's {label_names}")
    texts = data_lib.inputs(train)
    probabilities = classifier.scores(texts, 2 * config.train.batch_size)
    return rank_suspects(texts, np.asarray(train["label"]), probabilities, label_names, file_rows(config.data, train))


def write_suspects(suspects: list[Suspect], path: str | Path) -> Path:
    """The ranked CSV (every row; `suggested_label` equal to `given_label` where the model agrees); a `text_pair`
    column after `text` when the rows are sentence pairs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = any(s.text_pair is not None for s in suspects)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "text", *(["text_pair"] if pairs else []), "given_label", "suggested_label",
                         "confidence", "given_label_probability"])
        for s in suspects:
            writer.writerow(["" if s.row is None else s.row, s.text, *([s.text_pair] if pairs else []), s.given,
                             s.suggested, f"{s.confidence:.4f}", f"{s.given_probability:.4f}"])
    return path


def read_suspects(path: str | Path, limit: int) -> list[dict]:
    """The first `limit` rows of a suspects CSV that the model disagrees with, as written."""
    with Path(path).open(encoding="utf-8", newline="") as handle:
        rows = (row for row in csv.DictReader(handle) if row["suggested_label"] != row["given_label"])
        return [row for _, row in zip(range(limit), rows)]
