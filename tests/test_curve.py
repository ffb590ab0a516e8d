"""`afinar curve`: nested subsets that differ only in size, validation for every point, test read once at the
full size, a fitted line that predicts the full size, and a report that shows it."""

import json
from collections import Counter

import pytest
from conftest import sets, tiny_overrides

from afinar import cli
from afinar.core.errors import AfinarError
from afinar.data.sources import class_balanced_order
from afinar.experiments.curve import CurvePoint, curve_sizes, fit_line


def test_sizes_start_balanced_and_end_at_the_full_split():
    assert curve_sizes(24_500, 3) == [48, 192, 768, 3072, 12288, 24_500]
    assert curve_sizes(40, 3) == [40]


def test_the_order_puts_a_balanced_head_first_and_keeps_every_row():
    labels = [0] * 50 + [1] * 30 + [2] * 5
    order, head = class_balanced_order(labels, seed=1, per_class=8)
    assert sorted(order) == list(range(85)) and head == 21  # 8 + 8 + all 5 of the small class
    assert Counter(labels[i] for i in order[:head]) == {0: 8, 1: 8, 2: 5}
    assert order == class_balanced_order(labels, seed=1, per_class=8)[0]  # seeded
    assert order != class_balanced_order(labels, seed=2, per_class=8)[0]


def test_a_line_through_log_rows_gives_the_gain_per_doubling():
    points = [CurvePoint(rows, {"accuracy": 0.40 + 0.03 * k}) for k, rows in enumerate((100, 200, 400, 800))]
    fit = fit_line(points)
    assert fit.rows == [200, 400, 800] and fit.slope == pytest.approx(0.03)
    assert fit.predict(1600) == pytest.approx(0.52)
    assert fit_line(points[:1]) is None


def test_curve_end_to_end(tiny_bert, tweets_jsonl, tmp_path, capsys):
    train_file, test_file = tweets_jsonl
    out = tmp_path / "curve"
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path / "runs",
                               **{"train.epochs": None, "train.min_steps": 12, "train.run_name": None})
    assert cli.main(["curve", *sets(overrides), "--per-class", "8", "--out", str(out)]) == 0
    curve = json.loads((out / "curve.json").read_text())
    sizes = [p["rows"] for p in curve["points"]]
    assert sizes == [24, 96, curve["rows"]["train"]]
    texts = {size: {json.loads(line)["text"] for line in (out / "data" / f"train-{size}.jsonl").open()}
             for size in sizes}
    assert texts[24] < texts[96] < texts[sizes[-1]]  # nested
    assert Counter(json.loads(line)["label"] for line in (out / "data" / "train-24.jsonl").open()) == {
        "negative": 8, "neutral": 8, "positive": 8}
    # every point scored on the same validation rows; test read once, for the full size
    assert {p["validation"]["n"] for p in curve["points"]} == {curve["rows"]["validation"]}
    assert [p["test"] is not None for p in curve["points"]] == [False, False, True]
    assert curve["predicted_full"] is not None and curve["gain_from_doubling"]["rows"] == sizes
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Doubling the labelled data" in page
    assert "predicted" in capsys.readouterr().out
    # a second curve into the same folder must not mix with the first
    assert cli.main(["curve", *sets(overrides), "--out", str(out)]) == 2
    assert "already holds a learning curve" in capsys.readouterr().err


def test_unknown_strategy_is_an_input_error(tiny_bert, tweets_jsonl, tmp_path):
    from afinar.core.config import load_config
    from afinar.experiments.curve import learning_curve

    with pytest.raises(AfinarError, match="unknown strategy 'bert'"):
        learning_curve(load_config(overrides=tiny_overrides(tiny_bert, *tweets_jsonl, tmp_path)), "bert")
