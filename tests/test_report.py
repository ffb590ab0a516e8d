"""Reports: `diagnose` reads synthetic curves right, and a run folder becomes one self-contained HTML file."""

import json
import re

import pandas as pd
import pytest

from afinar.api import report as write_run_report
from afinar.core.config import CheckArgs, load_config
from afinar.core.runs import Run
from afinar.data.checks import run_checks
from afinar.data.sources import Splits, _to_dataset
from afinar.evaluation.diagnosis import diagnose, majority_class

LABELS = ["negative", "neutral", "positive"]


def history(train_losses, eval_losses, accuracies, every=10):
    """Trainer-style log_history: a training loss every 5 steps, an evaluation every `every` steps."""
    rows = [{"loss": loss, "step": 5 * (i + 1), "learning_rate": 1e-4} for i, loss in enumerate(train_losses)]
    rows += [{"eval_loss": loss, "eval_accuracy": acc, "step": every * (i + 1)}
             for i, (loss, acc) in enumerate(zip(eval_losses, accuracies))]
    return sorted(rows, key=lambda r: r["step"])


def falling(start, end, n):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def test_diagnose_over_fitting():
    log = history(falling(1.1, 0.05, 12), [0.9, 0.7, 0.6, 0.66, 0.75, 0.86], [0.6, 0.7, 0.74, 0.73, 0.72, 0.71])
    result = diagnose(log, majority_class(0.4))
    assert result.verdict == "over-fitting"
    assert "rose for the last 3 evaluations" in result.reasons[0] and "step 30" in result.reasons[0]


def test_diagnose_under_fitting():
    flat = history([1.10, 1.09, 1.10, 1.08, 1.09, 1.09], [1.09, 1.09, 1.08, 1.09], [0.41, 0.40, 0.42, 0.41])
    result = diagnose(flat, majority_class(0.40))
    assert result.verdict == "under-fitting"
    assert "majority class" in result.reasons[0] and "both losses are flat" in result.reasons[1]
    assert diagnose(flat).verdict == "under-fitting"  # no baseline: the flat losses alone


def test_diagnose_good_fit_and_too_short():
    good = history(falling(1.1, 0.45, 12), [0.9, 0.7, 0.6, 0.58, 0.57, 0.575], [0.6, 0.7, 0.75, 0.77, 0.78, 0.78])
    result = diagnose(good, majority_class(0.4))
    assert result.verdict == "good fit" and "38.0 points above" in result.reasons[0]
    assert "not (yet) enough" in result.reasons[-1]  # one small rise is noise, not over-fitting
    assert diagnose(history([1.0, 0.9], [0.8, 0.7], [0.5, 0.6]), majority_class(0.4)).verdict == "too short to tell"
    assert diagnose([], None).verdict == "too short to tell"


def scored(n=10):
    matrix = [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
    per_class = {name: {"precision": 0.7, "recall": 0.6, "f1": 0.65, "support": 4} for name in LABELS}
    return {"accuracy": 0.7, "macro_f1": 0.68, "majority_baseline": 0.4, "n": n, "loss": 0.8,
            "per_class": per_class, "confusion_matrix": matrix, "labels": LABELS}


@pytest.mark.parametrize("with_data_report", [True, False])
def test_run_report_is_self_contained(tmp_path, with_data_report):
    config = load_config(overrides=[f"train.output_dir={tmp_path}", "train.run_name=r"])
    run = Run.create(config)
    run.write("metrics.json", {"train": {"seconds": 12.0, "steps": 60, "samples_per_second": 40.0,
                                         "trainable_parameters": 1000, "total_parameters": 5000},
                               "validation": scored(), "test": scored()})
    run.write_log(history(falling(1.1, 0.05, 12), [0.9, 0.7, 0.6, 0.66, 0.75, 0.86],
                          [0.6, 0.7, 0.74, 0.73, 0.72, 0.71]))
    if with_data_report:
        texts = ["good", "bad", "meh", "good", ""]
        splits = Splits(*(_to_dataset(pd.DataFrame({"text": texts, "label": [2, 0, 1, 2, 1]}),
                                      LABELS) for _ in range(3)), LABELS)
        run.write("data_report.json", run_checks(splits, CheckArgs()).to_dict())
    run.model_dir.mkdir()
    run.set_status("finished")
    path = write_run_report(run.path)
    page = path.read_text(encoding="utf-8")
    assert path == tmp_path / "r" / "report.html"
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{500,}"', page)) == 3  # curves, matrix, bars
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched
    assert "over-fitting" in page and "rose for the last 3 evaluations" in page
    assert "0.7000" in page and "majority baseline" in page
    if with_data_report:
        assert "Data checks" in page and "duplicates (normalised)" in page and "Actions" not in page
    else:
        assert "No data report" in page
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test"]["n"] == 10
