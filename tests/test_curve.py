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


def test_sizes_start_balanced_end_at_the_full_split_and_stay_two_doublings_below_it():
    assert curve_sizes(24_500, 3) == [48, 382, 1531, 6125, 24_500]
    assert curve_sizes(13_000, 3) == [48, 203, 812, 3250, 13_000]  # x4 up from 48 ended 0.08 doublings short
    assert curve_sizes(40, 3) == [40]


def _points(accuracies, sizes, n=400, seed=0):
    """Curve points scoring the same `n` validation rows, each with its per-row predictions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    points = []
    for accuracy, rows in zip(accuracies, sizes):
        predicted = gold.copy()
        wrong = rng.choice(n, round(n * (1 - accuracy)), replace=False)
        predicted[wrong] = (gold[wrong] + 1) % 3
        points.append(CurvePoint(rows, {"accuracy": float((predicted == gold).mean()),
                                        "rows": {"gold": gold.tolist(), "predicted": predicted.tolist()}}))
    return points


def test_the_gain_per_doubling_and_the_prediction_carry_intervals_from_resampled_validation_rows():
    points = _points([0.50, 0.55, 0.60, 0.65], [100, 200, 400, 800])
    fit = fit_line(points)
    assert fit.slope == pytest.approx(0.05, abs=1e-9)
    low, high = fit.slope_ci95
    assert low < fit.slope < high and 0.005 < high - low < 0.1  # 400 rows: a few points either way
    predicted_low, predicted_high = fit.predict_interval(3200)
    assert predicted_low < fit.predict(3200) < predicted_high
    assert high - low < 2 * (fit_line(_points([0.50, 0.55, 0.60, 0.65], [100, 200, 400, 800], n=100)).slope_ci95[1]
                             - fit_line(_points([0.50, 0.55, 0.60, 0.65], [100, 200, 400, 800], n=100)).slope_ci95[0])


def test_no_full_size_prediction_across_less_than_one_doubling():
    from afinar.data.sources import Splits
    from afinar.experiments.curve import _summarise

    points = _points([0.5, 0.55, 0.6, 0.61], [768, 3072, 12288, 13000])
    splits = Splits(train=[0] * 13000, validation=[0] * 400, test=None, label_names=["a", "b", "c"])
    curve = _summarise(None, "full", splits, points, 13000)
    assert curve.predicted_full is None and "only 0.08 doublings below 13,000" in curve.no_prediction
    assert curve.gain_from_doubling.slope_ci95 is not None


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
    assert fit.predict(1600) == pytest.approx(0.52) and fit.slope_ci95 is None  # no rows kept: no interval
    assert fit_line(points[:1]) is None


def test_curve_end_to_end(tiny_bert, tweets_jsonl, tmp_path, capsys):
    train_file, test_file = tweets_jsonl
    out = tmp_path / "curve"
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path / "runs",
                               **{"train.epochs": None, "train.min_steps": 12, "train.run_name": None})
    assert cli.main(["curve", *sets(overrides), "--per-class", "8", "--out", str(out)]) == 0
    curve = json.loads((out / "curve.json").read_text())
    sizes = [p["rows"] for p in curve["points"]]
    full = curve["rows"]["train"]
    assert sizes == [24, full // 4, full]
    texts = {size: {json.loads(line)["text"] for line in (out / "data" / f"train-{size}.jsonl").open()}
             for size in sizes}
    assert texts[24] < texts[full // 4] < texts[full]  # nested
    assert Counter(json.loads(line)["label"] for line in (out / "data" / "train-24.jsonl").open()) == {
        "negative": 8, "neutral": 8, "positive": 8}
    # every point scored on the same validation rows; test read once, for the full size
    assert {p["validation"]["n"] for p in curve["points"]} == {curve["rows"]["validation"]}
    assert [p["test"] is not None for p in curve["points"]] == [False, False, True]
    assert curve["predicted_full"] is not None and curve["gain_from_doubling"]["rows"] == sizes
    low, high = curve["predicted_full_ci95"]
    assert low <= curve["predicted_full"] <= high and curve["gain_from_doubling"]["slope_ci95"]
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
