"""Model cards, hub pushes (through a recorder in place of `HfApi`) and `afinar diff`."""

import json

import pytest
from conftest import tiny_overrides
from huggingface_hub import ModelCard

import afinar
from afinar import cli
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.reporting.hub import push


@pytest.fixture(scope="module")
def two_runs(tiny_bert, tmp_path_factory):
    """Two finished runs that differ in learning rate only."""
    folder = tmp_path_factory.mktemp("hub")
    train_file, test_file = folder / "train.jsonl", folder / "test.jsonl"
    from conftest import tweet_rows

    train_file.write_text("".join(json.dumps(r) + "\n" for r in tweet_rows("train", 200)), encoding="utf-8")
    test_file.write_text("".join(json.dumps(r) + "\n" for r in tweet_rows("test", 60)), encoding="utf-8")
    return [afinar.train(load_config(overrides=tiny_overrides(
        tiny_bert, train_file, test_file, folder, **{"train.run_name": name, "train.learning_rate": rate,
                                                      "train.max_steps": 4})))
            for name, rate in (("a", 1e-3), ("b", 2e-3))]


def test_every_saved_model_has_a_valid_model_card(two_runs):
    run = two_runs[0]
    card = ModelCard.load(run.run_dir / "model" / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text-classification" and "afinar" in data["tags"]
    [index] = data["model-index"]
    accuracy = next(m for m in index["results"][0]["metrics"] if m["type"] == "accuracy")
    assert accuracy["value"] == pytest.approx(run.metrics["test"]["accuracy"])
    assert "## Intended use and limitations" in card.text and "learning curves:" in card.text


def test_evaluate_on_other_data_lands_on_the_card(two_runs, tmp_path, capsys):
    run = two_runs[0]
    other = tmp_path / "other.jsonl"
    from conftest import tweet_rows

    other.write_text("".join(json.dumps(r) + "\n" for r in tweet_rows("test", 90)[60:]), encoding="utf-8")
    assert cli.main(["evaluate", str(run.run_dir), "--data", str(other)]) == 0
    assert str(other) in ModelCard.load(run.run_dir / "model" / "README.md").text


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        from pathlib import Path

        self.calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"])
                                                                      .iterdir())}))


def test_push_uploads_the_model_folder_with_its_card(two_runs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    api = RecordingApi()
    url = push(two_runs[0].run_dir, "someone/tweets-minilm", private=True, api=api)
    assert url == "https://huggingface.co/someone/tweets-minilm"
    (create, created), (upload, uploaded) = api.calls
    assert create == "create_repo" and created["repo_id"] == "someone/tweets-minilm" and created["private"] is True
    assert upload == "upload_folder" and uploaded["folder_path"] == str(two_runs[0].run_dir / "model")
    assert {"README.md", "config.json", "model.safetensors"} <= set(uploaded["files"])


def test_push_offline_is_a_one_line_error(two_runs, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AfinarError, match="HF_HUB_OFFLINE is set"):
        push(two_runs[0].run_dir, "someone/x", api=RecordingApi())
    assert cli.main(["push", str(two_runs[0].run_dir), "--repo-id", "someone/x"]) == 2


def test_diff_names_the_learning_rate_and_the_package_version_and_nothing_else(two_runs, capsys):
    a, b = two_runs
    manifest = json.loads((b.run_dir / "manifest.json").read_text())
    manifest["versions"]["transformers"] = "9.9.9"  # as if B ran after an upgrade
    (b.run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["diff", str(a.run_dir), str(b.run_dir), "--json"]) == 0
    difference = json.loads(capsys.readouterr().out)
    assert difference["differences"] == {
        "config": {"train.learning_rate": [0.001, 0.002]},
        "versions": {"transformers": [json.loads((a.run_dir / "manifest.json").read_text())["versions"]
                                      ["transformers"], "9.9.9"]}}
    assert "accuracy" in difference["metrics"]["test"] and difference["metrics"]["test"]["accuracy"]["ci95_a"]
    assert cli.main(["diff", str(a.run_dir), str(b.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate: 0.001 -> 0.002" in out
    # the same 60 test rows: the difference gets a paired interval, and only that decides "within noise"
    from afinar.evaluation.metrics import paired_difference

    rows_a, rows_b = a.metrics["test"]["rows"], b.metrics["test"]["rows"]
    assert rows_a["gold"] == rows_b["gold"] and len(rows_a["gold"]) == 60
    paired = paired_difference(rows_a["gold"], rows_a["predicted"], rows_b["predicted"], 3)["accuracy"]["ci95"]
    assert difference["metrics"]["test"]["accuracy"]["paired_ci95"] == paired
    assert f"same rows, 95% paired interval [{paired[0]:+.4f}, {paired[1]:+.4f}]" in out


def test_diff_of_runs_on_different_rows_shows_separate_intervals_and_claims_no_noise(two_runs, tmp_path, capsys):
    import shutil

    a, b = two_runs
    other = shutil.copytree(b.run_dir, tmp_path / "other")
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["test"]["rows"]["gold"] = metrics["test"]["rows"]["gold"][::-1]  # as if scored on other rows
    (other / "metrics.json").write_text(json.dumps(metrics))
    assert cli.main(["diff", str(a.run_dir), str(other)]) == 0
    test_lines = capsys.readouterr().out.split("test metrics (B - A):")[1]
    assert "not the same rows, so not paired" in test_lines and "noise" not in test_lines
    del metrics["test"]["rows"]  # as a run written before rows were recorded
    (other / "metrics.json").write_text(json.dumps(metrics))
    assert cli.main(["diff", str(a.run_dir), str(other)]) == 0
    assert "a run did not record its rows, so not paired" in capsys.readouterr().out

