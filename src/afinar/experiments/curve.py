"""How much data do I need? `afinar curve CONFIG` trains one strategy on growing, nested, seeded subsets of the
training split and fits validation accuracy against log2(rows).

Only the size changes between points: every subset is a prefix of one seeded order whose head holds
`per_class` rows of each class (`data.sources.class_balanced_order`), so each subset contains the smaller ones; the
validation rows, the seed and the settings are the same for all (unset ones scale with the data, `scaling`).
Validation scores every point; test is read once, for the full-size point. The fit is a straight line through
the three largest points, so its slope is the accuracy gained per doubling of labelled data there; the same
line through the three largest points *below* full size predicts the full-size score, and the report puts
that prediction beside the measured one, so a user can see how far to trust the extrapolation. Sizes step down
from the full size by a factor of 4, so the last point below it is two doublings away; a prediction across less
than one doubling (user-chosen sizes) is not made, since it would test nothing. Both the slope and the
prediction carry 95% intervals from resampling the validation rows (the same resample for every point, as they
score the same rows): a single seed's curve is noisy, and the intervals say how much.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.core.runs import earlier_record, write_atomic, write_json
from afinar.data import sources as data_lib
from afinar.evaluation.metrics import BOOTSTRAP_SAMPLES, resamples
from afinar.experiments.compare import STRATEGIES, checked_into, experiment_folder, run_strategy

log = logging.getLogger(__name__)

FIT_POINTS = 3  # the largest points a learning-curve line goes through
MIN_EXTRAPOLATION_DOUBLINGS = 1.0  # a full-size prediction must reach at least this far past its last point


@dataclass
class CurvePoint:
    rows: int
    validation: dict  # `metrics.classification_report`
    test: dict | None = None  # the full-size point only
    train_seconds: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.validation["accuracy"]


@dataclass
class CurveFit:
    """accuracy = intercept + slope * log2(rows), through `rows`."""

    rows: list[int]
    intercept: float
    slope: float  # validation accuracy gained per doubling of the training rows
    slope_ci95: list[float] | None = None  # from resampled validation rows
    resampled: np.ndarray | None = field(default=None, repr=False)  # (samples x 2): intercepts and slopes

    def predict(self, rows: int) -> float:
        return self.intercept + self.slope * math.log2(rows)

    def predict_interval(self, rows: int) -> list[float] | None:
        if self.resampled is None:
            return None
        return np.percentile(self.resampled[:, 0] + self.resampled[:, 1] * math.log2(rows), [2.5, 97.5]
                             ).round(4).tolist()


@dataclass
class CurveResult:
    path: Path
    strategy: str
    label_names: list[str]
    points: list[CurvePoint]
    gain_from_doubling: CurveFit | None  # through the largest points, the full size included
    extrapolation: CurveFit | None  # through the largest points below the full size
    predicted_full: float | None  # `extrapolation` at the full size ...
    measured_full: float | None  # ... and what the full size measured (validation)
    rows: dict[str, int] = field(default_factory=dict)
    predicted_full_ci95: list[float] | None = None
    no_prediction: str | None = None  # why the full size was not predicted, when it was not

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        for fit in ("gain_from_doubling", "extrapolation"):
            if out[fit]:
                out[fit].pop("resampled")
        return out


def curve_sizes(train_rows: int, classes: int, per_class: int = 16, factor: int = 4) -> list[int]:
    """The full training split, then down by `factor` while above the balanced head (`per_class` rows of each
    class, always the first size): the last point below the full size is log2(`factor`) doublings below it, so
    predicting the full size from the smaller points tests a real extrapolation."""
    smallest = min(per_class * classes, train_rows)
    sizes, size = [train_rows], train_rows
    while size // factor >= 2 * smallest:  # the head and the next size at least a doubling apart
        size //= factor
        sizes.append(size)
    return sorted({*sizes, smallest})


def resampled_accuracies(points: list[CurvePoint], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
                         ) -> np.ndarray | None:
    """(samples x points) validation accuracies on resampled validation rows, the same resample for every point
    (they score the same rows, so the resample is paired); None when the points did not keep their rows."""
    rows = [p.validation.get("rows") for p in points]
    if not all(rows) or not rows[0]["gold"] or any(r["gold"] != rows[0]["gold"] for r in rows):
        return None
    gold = np.asarray(rows[0]["gold"])
    correct = np.stack([np.asarray(r["predicted"]) == gold for r in rows]).astype(float)  # points x n
    return np.concatenate([np.stack([np.bincount(pick, minlength=len(gold)) for pick in picks]) @ correct.T
                           for picks in resamples(len(gold), samples, seed)]) / len(gold)


def _lines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares (intercept, slope) of each row of `y` on `x`: (rows x 2)."""
    x_mean, y_mean = x.mean(), y.mean(axis=1)
    slope = ((x - x_mean) * (y - y_mean[:, None])).sum(axis=1) / ((x - x_mean) ** 2).sum()
    return np.stack([y_mean - slope * x_mean, slope], axis=1)


def fit_line(points: list[CurvePoint]) -> CurveFit | None:
    """Least squares of accuracy on log2(rows) through the last `FIT_POINTS` points (None with fewer than 2),
    with a 95% interval on its slope from resampled validation rows."""
    chosen = points[-FIT_POINTS:]
    if len(chosen) < 2:
        return None
    x = np.array([math.log2(p.rows) for p in chosen])
    intercept, slope = _lines(x, np.array([[p.accuracy for p in chosen]]))[0]
    accuracies = resampled_accuracies(chosen)
    resampled = None if accuracies is None else _lines(x, accuracies)
    interval = None if resampled is None else np.percentile(resampled[:, 1], [2.5, 97.5]).round(4).tolist()
    return CurveFit([p.rows for p in chosen], float(intercept), float(slope), interval, resampled)


def _write_rows(path: Path, ds, label_names: list[str]) -> Path:
    """A split as JSONL with label names, so a training run can read it like any user file."""
    columns = ds[:]
    pairs = columns.get("text_pair")
    lines = [json.dumps({"text": text, **({"text_pair": pairs[i]} if pairs else {}), "label": label_names[label]},
                        ensure_ascii=False) for i, (text, label) in enumerate(zip(columns["text"], columns["label"]))]
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _point_config(config: Config, files: dict[str, Path]) -> Config:
    """The configuration of one point: its subset files, no further subsetting, the same everything else."""
    config = copy.deepcopy(config)
    config.data.source, config.data.validation = str(files["train"]), str(files["validation"])
    config.data.test = str(files["test"]) if "test" in files else None
    config.data.max_train_samples = config.data.train_per_class = None
    config.data.text_column, config.data.label_column = "text", "label"  # as `_write_rows` names them
    config.data.text_pair_column = "text_pair" if "text_pair" in json.loads(
        files["train"].read_text(encoding="utf-8").splitlines()[0]) else None
    config.data.max_eval_samples = config.data.max_test_samples = None
    config.checks.suspects = False  # a point's model is a means to the curve; rank suspects with a real run
    return config.validate()


def _earlier_points(out: Path, config: Config, strategy: str, resume: bool) -> dict[int, CurvePoint]:
    saved = earlier_record(out, "curve.json", config, resume, "a learning curve")
    if saved is None:
        return {}
    if saved["strategy"] != strategy:
        raise AfinarError(f"{out} holds a curve of {saved['strategy']}; --resume needs the same strategy")
    return {p["rows"]: CurvePoint(**p) for p in saved["points"]}


def learning_curve(config: Config, strategy: str = "full", sizes: list[int] | None = None,
                   out_dir: str | Path | None = None, per_class: int = 16, resume: bool = False) -> CurveResult:
    """Train `strategy` (one of `experiments.compare.STRATEGIES`) on nested subsets of train (`sizes`, default
    `curve_sizes`), score each on validation and the full-size one once on test; write curve.json, the subset
    files and report.html into `out_dir` (default `<train.output_dir>/curve-<time>`). The file is rewritten after
    every point, so `resume` continues a killed curve from the points it finished."""
    from afinar.reporting.pages import write_curve_report
    from afinar.tasks.registry import require

    require(config, "compares", "curve")
    if strategy not in STRATEGIES:
        raise AfinarError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    config = copy.deepcopy(config).validate()
    out = experiment_folder(config, out_dir, "curve")
    earlier = _earlier_points(out, config, strategy, resume)
    splits = checked_into(out, config)
    labels = splits.train.select_columns("label")[:]["label"]
    order, _ = data_lib.class_balanced_order(labels, config.train.seed, per_class)
    full = len(order)
    sizes = sorted({min(s, full) for s in sizes}) if sizes else curve_sizes(full, len(splits.label_names), per_class)
    if sizes[-1] != full:
        sizes.append(full)  # test is read once, for the full size, so the curve always ends there
    data_dir = out / "data"
    files = {"validation": _write_rows(data_dir / "validation.jsonl", splits.validation, splits.label_names)}
    if splits.test is not None:
        files["test"] = _write_rows(data_dir / "test.jsonl", splits.test, splits.label_names)
    points: list[CurvePoint] = []
    for size in sizes:
        if size in earlier:
            log.info("curve point %d rows: kept from the earlier run in %s", size, out)
            points.append(earlier[size])
            continue
        subset = data_lib.select_rows(splits.train, order[:size])
        point_files = {"train": _write_rows(data_dir / f"train-{size}.jsonl", subset, splits.label_names),
                       "validation": files["validation"]}
        with_test = size == full and "test" in files
        if with_test:
            point_files["test"] = files["test"]
        point_splits = dataclasses.replace(splits, train=subset, test=splits.test if with_test else None)
        log.info("curve point %d of %d: %s on %d training rows", len(points) + 1, len(sizes), strategy, size)
        result = run_strategy(strategy, _point_config(config, point_files), point_splits, out / f"rows-{size}",
                              config.compare, config.prompt)
        points.append(CurvePoint(size, result.validation, result.test, result.train_seconds, result.details))
        log.info("%d rows: validation accuracy %.4f", size, result.val_accuracy)
        write_json(out / "curve.json", _summarise(out, strategy, splits, points, full).to_dict())
    curve = _summarise(out, strategy, splits, points, full)
    write_json(out / "curve.json", curve.to_dict())
    write_curve_report(out)
    return curve


def _summarise(out: Path, strategy: str, splits: data_lib.Splits, points: list[CurvePoint], full: int
               ) -> CurveResult:
    below = [p for p in points if p.rows < full]
    extrapolation, no_prediction = fit_line(below), None
    if extrapolation is not None and math.log2(full / below[-1].rows) < MIN_EXTRAPOLATION_DOUBLINGS:
        no_prediction = (f"the largest point below the full size ({below[-1].rows:,} rows) is only "
                         f"{math.log2(full / below[-1].rows):.2f} doublings below {full:,}: predicting the full "
                         f"size from it would test no extrapolation")
        extrapolation = None
    measured = next((p.accuracy for p in points if p.rows == full), None)
    return CurveResult(out, strategy, splits.label_names, points,
                       fit_line(points) if measured is not None else None, extrapolation,
                       extrapolation.predict(full) if extrapolation else None, measured,
                       {split: len(ds) for split, ds in splits.items()},
                       extrapolation.predict_interval(full) if extrapolation else None, no_prediction)
