"""Experiment trackers (`train.report_to: [tensorboard, mlflow, trackio, wandb]`) through `transformers`' own
integrations: `Trainer` logs the arguments and every training and evaluation step. afinar adds what only it
knows to the same tracker run after training: the held-out metrics (with their bootstrap intervals), training
time and peak memory, the data checks' counts, the resolved config, and `report.html` / `metrics.json` as
artifacts (MLflow) or text (TensorBoard). Browse many runs with the tracker's own UI (`mlflow ui`,
`tensorboard --logdir runs/`); afinar has no dashboard of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from afinar.core.errors import AfinarError

log = logging.getLogger(__name__)

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}  # -> module
TENSORBOARD_DIR = "tensorboard"  # inside the run folder, so it survives the checkpoints' removal


def log_strategy(out: Path, report_to: list[str], result: dict) -> None:
    """One `compare` strategy that trains no run of its own (prompting, retrieval, probe, SetFit): its scores and
    costs as a tracker run of its own, `compare-<strategy>` (training strategies track their runs themselves)."""
    figures = {f"{split}_{key}": float(value) for split in ("validation", "test")
               for key, value in (result.get(split) or {}).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    figures.update({key: float(result[key]) for key in ("train_seconds", "infer_texts_per_s", "peak_memory_mb")
                    if isinstance(result.get(key), (int, float))})
    name = f"compare-{result['name']}"
    if "mlflow" in report_to:
        mlflow = _mlflow()
        with mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None):
            mlflow.log_params({"strategy": result["name"], "model": result.get("model", "")})
            mlflow.log_metrics(figures)
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(out / TENSORBOARD_DIR / name)) as writer:
            for key, value in figures.items():
                writer.add_scalar(f"afinar/{key}", value)


@contextlib.contextmanager
def tracked_run(name: str, report_to: list[str]) -> Iterator[None]:
    """An MLflow run opened (nested in the active one, if any) for the block and closed after it: `afinar search`
    opens one for the study and one per trial inside it. `Trainer`'s callback logs into an active run rather than
    opening its own, so a trial's steps land in the trial's run under the study."""
    if "mlflow" not in report_to:
        yield
        return
    mlflow = _mlflow()
    with mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None):
        yield


def log_study(report_to: list[str], name: str, best_params: dict, best_validation: float, test: dict | None,
              folder: Path) -> None:
    """The study's outcome on its parent MLflow run: best parameters, best validation score, the one test score."""
    if "mlflow" not in report_to:
        return
    import mlflow

    run_id = _mlflow_run_named(name)
    if run_id is None:
        return
    client = mlflow.MlflowClient()
    for key, value in best_params.items():
        client.log_param(run_id, f"best.{key}", value)
    client.log_metric(run_id, "best_validation", float(best_validation))
    for key, value in (test or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, f"test_{key}", float(value))
    for file in ("search.json", "report.html"):
        if (folder / file).is_file():
            client.log_artifact(run_id, str(folder / file))


def _mlflow_run_named(name: str) -> str | None:
    """The id of the latest MLflow run called `name` in any experiment, nested or not (None: there is none), so a
    run another component opened and ended can be added to."""
    import mlflow

    found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{name}'", max_results=1,
                               order_by=["attributes.start_time DESC"], search_all_experiments=True,
                               output_format="list")
    return found[0].info.run_id if found else None


def _mlflow():
    """`mlflow`, pointed at `MLFLOW_EXPERIMENT_NAME` when it is set, as `Trainer`'s callback does."""
    import mlflow

    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
    return mlflow


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
    for key in ("seconds", "samples_per_second", "peak_host_memory_mb", "peak_gpu_memory_mb", "trainable_parameters"):
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

        run_id = _mlflow_run_named(run_path.name)  # `Trainer`'s callback opened (and usually ended) it
        if run_id is not None:
            client = mlflow.MlflowClient()
            for key, value in figures.items():
                client.log_metric(run_id, key, value)
            for file in files:
                client.log_artifact(run_id, str(file))
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
