"""`--seeds N`: the same run for N seeds, with the mean and spread of its scores."""

import json

import pytest
from conftest import sets, tiny_overrides

from afinar import cli


def test_several_seeds_report_mean_and_spread(tiny_bert, tweets_jsonl, tmp_path, capsys):
    overrides = tiny_overrides(tiny_bert, *tweets_jsonl, tmp_path, **{"train.max_steps": 4, "train.run_name": "s"})
    assert cli.main(["train", "--seeds", "2", *sets(overrides)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "s-seeds.json").read_text())
    accuracies = summary["per_seed"]["test"]["accuracy"]
    assert summary["seeds"] == [42, 43] and len(accuracies) == 2
    assert summary["mean"]["test"]["accuracy"] == pytest.approx(sum(accuracies) / 2)
    assert "test accuracy" in out and "±" in out and (tmp_path / "s-seed43" / "metrics.json").is_file()


def test_compare_over_seeds_reports_each_strategy_mean_and_spread(tiny_bert, tweets_jsonl, tmp_path, capsys):
    overrides = tiny_overrides(tiny_bert, *tweets_jsonl, tmp_path / "runs", **{
        "train.max_steps": 4, "train.run_name": None, "compare.encoder": str(tiny_bert), "compare.isolate": False})
    out = tmp_path / "compare"
    assert cli.main(["compare", *sets(overrides), "--strategies", "knn_retrieval,linear_probe", "--seeds", "2",
                     "--out", str(out)]) == 0
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [42, 43] and len(summary["accuracy"]["linear_probe"]["test"]) == 2
    assert "| knn_retrieval |" in capsys.readouterr().out and (out / "seed-43" / "comparison.json").is_file()
