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
from afinar.tasks.multilabel import MultiLabelClassifier, _label_set, multilabel_report, tune_thresholds

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
    tuned = multilabel_report(targets, probabilities, per_label, ["a", "b", "c"])
    fixed = multilabel_report(targets, probabilities, np.full(3, 0.5), ["a", "b", "c"])
    assert tuned["macro_f1"] >= fixed["macro_f1"]
    assert set(tuned) >= {"micro_f1", "macro_f1", "accuracy", "cardinality", "per_class", "n"}


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
                                          r"\(it applies to classification\)"):
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
