"""Hyperparameter search: pruning prunes, a study resumes, and the test split is read once, at the end."""

import json
import os
import signal
import socket
import subprocess
import time

import optuna
import pytest
import yaml
from conftest import afinar_cmd, postgres_binaries, sets, throwaway_postgres, tiny_overrides
from optuna.storages import RetryHeartbeatStaleTrialCallback

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


@pytest.fixture(scope="module")
def postgres() -> str:
    if not postgres_binaries():
        pytest.skip("no PostgreSQL server binary (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
    with throwaway_postgres() as url:
        yield url


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # retried_trial_number
def test_workers_share_a_postgresql_study_retry_a_killed_workers_trial_and_score_test_once(
        postgres, tiny_bert, tweets_jsonl, tmp_path, space_file):
    train_file, test_file = tweets_jsonl
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.max_steps": 4, "train.eval_every": 4, "train.run_name": None, "train.precision": "fp32"})
    command = afinar_cmd("search", *sets(overrides), "--space", str(space_file), "--trials", "4", "--pruner", "none",
                         "--storage", postgres, "--study", "shared", "--heartbeat", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed, survivor = (subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                        for _ in range(2))
    killed_id = f"{socket.gethostname()}:{killed.pid}"
    deadline = time.monotonic() + 240
    while True:  # SIGKILL the first worker mid-trial, once it has finished one
        assert time.monotonic() < deadline and killed.poll() is None, "the first worker never got to a second trial"
        try:
            trials = optuna.load_study(study_name="shared", storage=postgres).trials
        except KeyError:  # not created yet
            trials = []
        own = [t for t in trials if t.user_attrs.get("worker") == killed_id]
        if any(t.state.name == "COMPLETE" for t in own) and any(t.state.name == "RUNNING" for t in own):
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    out, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="shared", storage=postgres)
    [failed] = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed.user_attrs["worker"] == killed_id
    [retry] = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == failed.number]
    assert retry.state.name == "COMPLETE" and retry.params == failed.params and retry.user_attrs["worker"] != killed_id
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    # the budget, plus the retry when the survivor had reached it before the dead worker's heartbeat went stale
    assert len(complete) in (4, 5) and len({t.user_attrs["worker"] for t in complete}) == 2  # both workers' trials
    record = json.loads((tmp_path / "search-default" / "search.json").read_text())
    assert record["best_params"] == study.best_params and record["test"]["n"] == 60  # scored once, by the survivor
    assert len(list((tmp_path / "search-default").glob("test-claimed-*"))) == 1
    # a worker whose search differs is refused, the difference named
    other = search_config(tiny_bert, train_file, test_file, tmp_path, precision="fp32")
    with pytest.raises(AfinarError, match=r"differs from study shared's: config.train.max_steps: study 4, this "):
        search(other, trials=4, space=space_file, storage=postgres, study_name="shared")
