"""Trackers: a run with `train.report_to` read back by the trackers' own readers (MlflowClient, TensorBoard's
EventAccumulator): the arguments, per-step loss, afinar's test metrics and its report files."""

import pytest
from conftest import tiny_overrides

import afinar
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.reporting.trackers import check_trackers


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store that afinar logs into (through the environment, as a user sets it); returns
    the client and a function listing the runs of the experiment afinar wrote."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "afinar-test")
    client = MlflowClient(tracking_uri=uri)
    return client, lambda: client.search_runs([client.get_experiment_by_name("afinar-test").experiment_id])


def test_mlflow_run_holds_params_per_step_loss_test_metrics_and_the_report(tiny_bert, tweets_jsonl, tmp_path,
                                                                            mlflow_store):
    client, logged_runs = mlflow_store
    result = afinar.train(load_config(overrides=tiny_overrides(
        tiny_bert, *tweets_jsonl, tmp_path / "runs", **{"train.report_to": "[mlflow]", "train.max_steps": 6})))
    [run] = logged_runs()
    assert run.info.run_name == result.run_dir.name and run.info.status == "FINISHED"
    assert float(run.data.params["learning_rate"]) == 1e-3
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 3 and sorted(m.step for m in losses) == [m.step for m in sorted(losses, key=lambda m: m.step)]
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert "test_accuracy_ci95_low" in run.data.metrics and "data_rows_train" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.json"} <= artifacts


def test_tensorboard_events_hold_the_training_curve_and_afinar_figures(tiny_bert, tweets_jsonl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = afinar.train(load_config(overrides=tiny_overrides(
        tiny_bert, *tweets_jsonl, tmp_path, **{"train.report_to": "[tensorboard]", "train.max_steps": 6})))
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "train/loss" in tags and "afinar/test_accuracy" in tags
    [test_accuracy] = events.Scalars("afinar/test_accuracy")
    assert test_accuracy.value == pytest.approx(result.metrics["test"]["accuracy"])


def test_a_missing_tracker_is_a_one_line_error_naming_the_extra(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(AfinarError, match=r"pip install 'afinar\[wandb\]'"):
        check_trackers(["wandb"])
    with pytest.raises(AfinarError, match="unknown tracker 'neptune'"):
        load_config(overrides=["train.report_to=[neptune]"])


def test_search_trials_nest_under_the_study_and_compare_tracks_each_strategy(tiny_bert, tweets_jsonl, tmp_path,
                                                                             mlflow_store):
    import yaml

    from afinar.experiments.compare import CompareArgs, compare
    from afinar.experiments.search import search

    _, logged_runs = mlflow_store
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3}}))
    config = load_config(overrides=tiny_overrides(tiny_bert, *tweets_jsonl, tmp_path / "search", **{
        "train.max_steps": 4, "train.eval_every": 2, "train.run_name": None, "train.report_to": "[mlflow]"}))
    result = search(config, trials=2, space=space, pruner="none")
    compare(config, "knn_retrieval", tmp_path / "compare", CompareArgs(encoder=str(tiny_bert), isolate=False))
    runs = logged_runs()
    by_name = {r.info.run_name: r for r in runs}
    study = by_name[result.path.name]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    assert sorted(r.info.run_name for r in trials) == ["trial-0", "trial-1"]
    assert study.data.metrics["best_validation"] == pytest.approx(result.best_validation)
    assert "validation_accuracy" in by_name["compare-knn_retrieval"].data.metrics
