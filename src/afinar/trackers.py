"""Experiment trackers (`train.report_to: [tensorboard, mlflow, trackio, wandb]`) through `transformers`' own
integrations: `Trainer` logs the arguments and every training and evaluation step. afinar adds what only it
knows to the same tracker run after training: the held-out metrics (with their bootstrap intervals), training
time and peak memory, the data checks' counts, the resolved config, and `report.html` / `metrics.json` as
artifacts (MLflow) or text (TensorBoard). Browse many runs with the tracker's own UI (`mlflow ui`,
`tensorboard --logdir runs/`); afinar has no dashboard of its own.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from afinar.errors import AfinarError

log = logging.getLogger(__name__)

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}  # -> module
TENSORBOARD_DIR = "tensorboard"  # inside the run folder, so it survives the checkpoints' removal


def check_trackers(report_to: list[str]) -> None:
    """Unknown names and missing packages are one-line errors naming the extra to install."""
    for name in report_to:
        if name not in TRACKERS:
            raise AfinarError(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise AfinarError(f"train.report_to={name} needs the {name} package: pip install 'afinar[{name}]'")


def trainer_setup(run_path: Path, report_to: list[str]) -> tuple[list[str], list]:
    """(`TrainingArguments.report_to`, extra callbacks): TensorBoard writes into the run folder."""
    callbacks = []
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_path / TENSORBOARD_DIR))))
    return [name for name in report_to if name != "tensorboard"] or ["none"], callbacks


def _figures(metrics: dict, data_report: dict | None) -> dict[str, float]:
    figures = {}
    for split in ("validation", "test"):
        for key, value in (metrics.get(split) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                figures[f"{split}_{key}"] = float(value)
        for key, interval in ((metrics.get(split) or {}).get("ci95") or {}).items():
            figures[f"{split}_{key}_ci95_low"], figures[f"{split}_{key}_ci95_high"] = map(float, interval)
    train = metrics.get("train") or {}
    for key in ("seconds", "samples_per_second", "peak_memory_mb", "trainable_parameters"):
        if isinstance(train.get(key), (int, float)):
            figures[f"train_{key}"] = float(train[key])
    for split, rows in ((data_report or {}).get("rows") or {}).items():
        figures[f"data_rows_{split}"] = float(rows)
    dropped = sum(len(action.get("rows", [])) for action in (data_report or {}).get("actions", []))
    figures["data_train_rows_dropped"] = float(dropped)
    return figures


def log_results(run_path: Path, report_to: list[str], metrics: dict, data_report: dict | None) -> None:
    """afinar's own figures and files, into the tracker runs `Trainer` opened for this run."""
    figures = _figures(metrics, data_report)
    files = [run_path / name for name in ("report.html", "metrics.json", "config.yaml") if (run_path / name).is_file()]
    if "mlflow" in report_to:
        import mlflow

        tracked = mlflow.active_run() or mlflow.last_active_run()  # `Trainer`'s callback ends the run it started
        if tracked is not None and tracked.info.run_name == run_path.name:
            if mlflow.active_run() is None:
                mlflow.start_run(run_id=tracked.info.run_id)  # reopened: the same run, not a new one
            mlflow.log_metrics(figures)
            for file in files:
                mlflow.log_artifact(str(file))
            mlflow.end_run()
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_path / TENSORBOARD_DIR)) as writer:
            for key, value in figures.items():
                writer.add_scalar(f"afinar/{key}", value)
            config = run_path / "config.yaml"
            if config.is_file():
                writer.add_text("afinar/config", "```\n" + config.read_text(encoding="utf-8") + "\n```")
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.run.summary.update(figures)
            for file in files:
                wandb.save(str(file), base_path=str(run_path))
            wandb.finish()
    if "trackio" in report_to:
        import trackio

        trackio.log(figures)
        trackio.finish()
