"""Hyperparameter search: pruning prunes, a study resumes, and the test split is read once, at the end."""

import json

import optuna
import pytest
import yaml
from conftest import tiny_overrides

from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.data import sources as data_lib
from afinar.experiments.search import load_space, search

SPACE = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
         "train.batch_size": {"type": "categorical", "choices": [8, 16]}}


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def search_config(model, train_file, test_file, out, precision="auto"):
    return load_config(overrides=tiny_overrides(model, train_file, test_file, out, **{
        "train.max_steps": 12, "train.eval_every": 4, "train.run_name": None, "train.precision": precision}))


def test_test_split_is_read_once_after_all_trials(tiny_bert, tweets_jsonl, tmp_path, space_file, monkeypatch):
    train_file, test_file = tweets_jsonl
    reads = []  # every split file afinar opens is hashed first (the hash keys the data cache), cached or not
    original = data_lib.sha256_file
    monkeypatch.setattr(data_lib, "sha256_file", lambda path: reads.append(str(path)) or original(path))
    result = search(search_config(tiny_bert, train_file, test_file, tmp_path), trials=3, space=space_file,
                    pruner="none")
    assert reads.count(str(test_file)) == 1 and reads[-1] == str(test_file)  # once, after every trial
    assert reads.count(str(train_file)) == 4  # three trials and the final scoring
    gold = [json.loads(line)["label"] for line in test_file.read_text().splitlines()]  # scored in file order
    scored = result.test["rows"]
    assert scored["gold"] == gold and result.test["accuracy"] == pytest.approx(
        sum(g == p for g, p in zip(gold, scored["predicted"])) / 60)
    saved = json.loads((result.path / "search.json").read_text())
    assert saved["test_scored_once_for"] == f"trial-{saved['best_trial']}"
    assert len(saved["trials"]) == 3 and all(row["seed"] == 42 for row in saved["trials"])
    baseline, *others = saved["trials"]  # trial 0 is the configuration as given, the one to beat
    assert baseline["baseline"] and baseline["train.learning_rate"] == 1e-3 and baseline["train.batch_size"] == 16
    assert not any(row["baseline"] for row in others)
    assert saved["diagnosis"]["verdict"] and "(as configured)" in (result.path / "summary.md").read_text()
    report = (result.path / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(saved["plots"]) >= 1 and "Diagnosis of the best run" in report
    best = load_config(result.path / "best_config.yaml")  # ready to run
    assert best.train.learning_rate == pytest.approx(result.best_params["train.learning_rate"])
    assert (result.path / "history.png").is_file() and (result.path / "trials.csv").is_file()
    trials = sorted((result.path / "trials").iterdir())
    assert [(t / "model").is_dir() for t in trials].count(True) == 1  # only the best model is kept
    assert all("test" not in json.loads((t / "metrics.json").read_text()) for t in trials)


def test_pruning_stops_trials_early(tiny_bert, tweets_jsonl, tmp_path, space_file):
    train_file, test_file = tweets_jsonl
    # a threshold no tiny model reaches: every trial is pruned at its first evaluation
    with pytest.raises(AfinarError, match="no trial .* finished"):
        search(search_config(tiny_bert, train_file, test_file, tmp_path), trials=2, space=space_file,
               pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    study = optuna.load_study(study_name="afinar", storage=f"sqlite:///{tmp_path / 'search-default' / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [4] for t in study.trials)  # stopped at step 4 of 12


def test_an_interrupted_search_resumes_the_same_study(tiny_bert, tweets_jsonl, tmp_path, space_file):
    """Trials here train under bf16 autocast, forced: the path CPUs with native bf16 take under `auto`."""
    train_file, test_file = tweets_jsonl
    config = search_config(tiny_bert, train_file, test_file, tmp_path, precision="bf16")
    first = search(config, trials=2, space=space_file, pruner="none")
    second = search(search_config(tiny_bert, train_file, test_file, tmp_path, precision="bf16"), trials=3,
                    space=space_file, pruner="none")
    assert [r["trial"] for r in second.trials] == [0, 1, 2]
    assert second.trials[:2] == first.trials  # the earlier trials are kept, not rerun
    manifests = [json.loads(path.read_text()) for path in (second.path / "trials").glob("*/manifest.json")]
    assert len(manifests) == 3 and {m["precision"]["precision"] for m in manifests} == {"bf16"}


def test_space_file_errors_name_the_key(tmp_path):
    config = load_config()
    bad = tmp_path / "s.yaml"
    bad.write_text("train.learnin_rate: {type: float, low: 1.0e-5, high: 1.0e-3}\n")
    with pytest.raises(AfinarError, match="did you mean 'train.learning_rate'"):
        load_space(bad, config)
    bad.write_text("train.epochs: {type: int, low: 1}\n")
    with pytest.raises(AfinarError, match="train.epochs \\(int\\) needs high"):
        load_space(bad, config)
    assert "lora.r" in load_space(None, load_config(overrides=["lora=true"]))
