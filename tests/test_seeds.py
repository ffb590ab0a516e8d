"""`--seeds N`: the same run for N seeds, with the mean and spread of its scores."""

import json

import pytest

from afinar import cli

from conftest import sets, tiny_overrides


def test_several_seeds_report_mean_and_spread(tiny_bert, tweets_jsonl, tmp_path, capsys):
    overrides = tiny_overrides(tiny_bert, *tweets_jsonl, tmp_path, **{"train.max_steps": 4, "train.run_name": "s"})
    assert cli.main(["train", "--seeds", "2", *sets(overrides)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "s-seeds.json").read_text())
    accuracies = summary["per_seed"]["test"]["accuracy"]
    assert summary["seeds"] == [42, 43] and len(accuracies) == 2
    assert summary["mean"]["test"]["accuracy"] == pytest.approx(sum(accuracies) / 2)
    assert "test accuracy" in out and "±" in out and (tmp_path / "s-seed43" / "metrics.json").is_file()
