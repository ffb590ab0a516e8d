"""Multi-label classification on real GoEmotions rows: label sets in every spelling, a mean-pooling sigmoid head,
thresholds tuned on validation, predictions with every label above its threshold, and single-label training
refusing label sets."""

import json

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import ModelCard
from conftest import SHARED, sets

import afinar
from afinar import cli
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.evaluation.diagnosis import baseline_of, diagnose, majority_class
from afinar.tasks.multilabel import (
    MIN_POSITIVES,
    MultiLabelClassifier,
    _label_set,
    cross_fitted,
    multilabel_report,
    text_blind_macro_f1,
    tune_thresholds,
)

GOEMOTIONS = SHARED / "goemotions"


def _goemotions(tmp_path, rows: int = 240):
    """Copies of the first rows of train and test, with labels.txt beside them (ids -> names)."""
    folder = tmp_path / "goemotions"
    folder.mkdir()
    for split, n in (("train", rows), ("test", 60)):
        frame = pd.read_csv(GOEMOTIONS / f"{split}.tsv", sep="\t", dtype=str, keep_default_na=False).head(n)
        frame.to_csv(folder / f"{split}.tsv", sep="\t", index=False)
    (folder / "labels.txt").write_text((GOEMOTIONS / "labels.txt").read_text())
    return folder


def test_label_sets_in_every_spelling():
    assert _label_set("3,15", "x") == ["3", "15"] and _label_set("joy|love", "x") == ["joy", "love"]
    assert _label_set('["joy", "love"]', "x") == ["joy", "love"] and _label_set(np.array(["a"]), "x") == ["a"]
    assert _label_set("", "x") == [] and _label_set(None, "x") == []


def test_thresholds_are_tuned_per_label_on_validation():
    rng = np.random.default_rng(0)
    targets = (rng.random((400, 3)) < [0.5, 0.1, 0.3]).astype(int)
    probabilities = np.clip(targets * 0.3 + rng.random((400, 3)) * 0.6, 0, 1)  # label 1 needs a low threshold
    best_global, per_label = tune_thresholds(targets, probabilities)
    assert 0.05 <= best_global <= 0.95 and per_label.shape == (3,)
    tuned = multilabel_report(targets, probabilities >= per_label, ["a", "b", "c"])
    fixed = multilabel_report(targets, probabilities >= 0.5, ["a", "b", "c"])
    assert tuned["macro_f1"] >= fixed["macro_f1"]
    assert set(tuned) >= {"micro_f1", "macro_f1", "accuracy", "cardinality", "per_class", "n"}


def test_a_label_with_few_validation_positives_keeps_the_global_threshold():
    """Two positives would pick a threshold by chance: below `MIN_POSITIVES` a label keeps the global one."""
    rng = np.random.default_rng(1)
    targets = (rng.random((300, 2)) < [0.4, 0.0]).astype(int)
    targets[:2, 1] = 1  # label 1: two positives, both scored low
    probabilities = np.clip(targets * 0.4 + rng.random((300, 2)) * 0.5, 0, 1)
    probabilities[:2, 1] = 0.06
    best_global, per_label = tune_thresholds(targets, probabilities)
    assert per_label[1] == best_global and per_label[1] != 0.05  # not the threshold fitted to its two rows
    targets[:MIN_POSITIVES, 1], probabilities[:MIN_POSITIVES, 1] = 1, 0.06
    assert tune_thresholds(targets, probabilities)[1][1] == 0.05  # enough positives: its own threshold


def test_validation_figures_come_from_cross_fitted_thresholds_not_the_ones_they_chose():
    """Noise-only probabilities: thresholds chosen on the same rows find a macro-F1 above what unseen rows get;
    cross-fitted ones read what test reads."""
    rng = np.random.default_rng(2)
    targets = (rng.random((60, 6)) < 0.15).astype(int)  # a small validation split
    probabilities = rng.random((60, 6))  # nothing learnt
    _, per_label = tune_thresholds(targets, probabilities)
    same_rows = multilabel_report(targets, probabilities >= per_label, list("abcdef"))["macro_f1"]
    unseen_targets, unseen = (rng.random((5000, 6)) < 0.15).astype(int), rng.random((5000, 6))
    unseen_f1 = multilabel_report(unseen_targets, unseen >= per_label, list("abcdef"))["macro_f1"]
    crossed = multilabel_report(targets, cross_fitted(targets, probabilities, seed=0)[0], list("abcdef"))["macro_f1"]
    assert same_rows > unseen_f1 + 0.02 and abs(crossed - unseen_f1) < same_rows - unseen_f1
    one_row = cross_fitted(targets[:1], probabilities[:1], seed=0)  # no half to tune on: no crash
    assert one_row[0].shape == (1, 6)


def test_the_diagnosis_baseline_for_label_sets_is_text_blind_macro_f1():
    """Sparse labels: the commonest label set is the empty one, and subset accuracy against it called a model
    that learnt every label "nothing useful". The text-blind macro-F1 (all rows or none per label) is the bar."""
    targets = np.zeros((100, 4), dtype=int)
    targets[:10, 0] = targets[10:20, 1] = targets[20:30, 2] = targets[30:40, 3] = 1  # 60 rows with no label
    assert text_blind_macro_f1(targets) == pytest.approx(2 * 0.1 / 1.1)
    learnt = targets.copy()
    learnt[:40:2] = 0  # half of each label found
    report = multilabel_report(targets, learnt, list("abcd"))
    assert report["accuracy"] == 0.8 and report["baseline"]["metric"] == "macro_f1"
    log = [{"step": s, "loss": 1.0 - s / 10} for s in range(1, 9)] + \
          [{"step": s, "eval_loss": 1.0 - s / 20, "eval_macro_f1": f, "eval_accuracy": 0.6}
           for s, f in ((2, 0.3), (4, 0.5), (6, 0.66), (8, report["macro_f1"]))]
    diagnosis = diagnose(log, baseline_of(report))
    assert diagnosis.verdict == "good fit" and "validation macro-F1 0.667" in diagnosis.reasons[0]
    # against the commonest label set (all-empty: 0.6 of rows) subset accuracy 0.6 read as nothing learnt
    assert diagnose(log, majority_class(0.6)).verdict == "under-fitting"


def test_multilabel_run_end_to_end_on_goemotions_rows(tiny_bert, tmp_path, capsys):
    folder = _goemotions(tmp_path)
    assert cli.main(["train", *sets(["task=multilabel", f"model={tiny_bert}", f"data.source={folder}",
                                     f"train.output_dir={tmp_path}", "train.run_name=ml", "train.max_steps=6",
                                     "train.batch_size=16", "data.max_length=48", "train.learning_rate=1e-3"])]) == 0
    printed = capsys.readouterr().out  # multi-label figures, not single-label accuracy with intervals
    assert "test: macro-F1" in printed and "one global threshold" in printed and "bootstrap" not in printed
    run_dir = tmp_path / "ml"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = (GOEMOTIONS / "labels.txt").read_text().split()
    assert list(metrics["test"]["per_class"]) == names and metrics["test"]["n"] == 60
    assert set(metrics["thresholds"]["per_label"]) == set(names)
    saved = json.loads((run_dir / "model" / "thresholds.json").read_text())
    assert saved == metrics["thresholds"]
    report = json.loads((run_dir / "data_report.json").read_text())["labels"]
    assert report["splits"]["train"]["cardinality"] >= 1.0 and "never_in_train" in report
    capsys.readouterr()
    assert cli.main(["predict", str(run_dir), "I love this, thank you!", "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)
    assert set(prediction["scores"]) == set(names) and isinstance(prediction["labels"], list)
    above = [n for n in names if prediction["scores"][n] >= saved["per_label"][n]]
    assert prediction["labels"] == above
    page = (run_dir / "report.html").read_text()
    assert "Per-label scores" in page
    # the card claims no pipeline() it cannot serve, and its way of loading gives afinar predict's answer
    card = ModelCard.load(run_dir / "model" / "README.md")
    assert card.data.pipeline_tag is None and "thresholds.json" in card.text and "MultiLabelClassifier" in card.text
    [loaded] = MultiLabelClassifier(run_dir / "model").predict(["I love this, thank you!"])
    assert loaded.labels == prediction["labels"] and loaded.scores == pytest.approx(prediction["scores"], abs=1e-3)


def test_search_refuses_a_multilabel_config_before_any_trial(tiny_bert, tmp_path):
    import time

    from afinar.experiments.search import search

    config = load_config(overrides=["task=multilabel", f"model={tiny_bert}", f"train.output_dir={tmp_path}"])
    started = time.perf_counter()
    with pytest.raises(AfinarError, match="afinar search does not apply to task 'multilabel' "
                                          r"\(it applies to classification,"):
        search(config, trials=2)
    assert time.perf_counter() - started < 1.0 and not (tmp_path / "search-default").exists()


def test_single_label_training_refuses_label_sets(tiny_bert, tmp_path):
    folder = _goemotions(tmp_path)
    with pytest.raises(AfinarError, match="this is multi-label data; set task=multilabel"):
        afinar.train(load_config(overrides=[f"model={tiny_bert}", f"data.source={folder}",
                                            f"train.output_dir={tmp_path}"]))


def test_class_weights_become_bce_positive_weights():
    import torch

    from afinar.tasks.multilabel import WeightedBCE, positive_weights

    assert positive_weights("balanced", [[0], [0, 1], [0], []], ["a", "b"]) == [1 / 3, 3.0]
    assert positive_weights("b=4", [[0]], ["a", "b"]) == [1.0, 4.0] and positive_weights("none", [[0]], ["a"]) is None
    logits, labels = torch.tensor([[0.0, -2.0]]), torch.tensor([[1.0, 1.0]])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert WeightedBCE([1.0, 1.0])({"logits": logits}, labels) == pytest.approx(plain.item())
    assert WeightedBCE([1.0, 5.0])({"logits": logits}, labels) > plain
