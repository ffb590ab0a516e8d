"""Hyperparameter search that cannot cheat: Optuna on validation only, test scored once for the best trial.

Each trial is an ordinary afinar training run (`tasks.registry.train`) with the test split never read; a pruning
callback reports every validation evaluation to Optuna and stops hopeless trials early. By default the study
lives in SQLite inside the search folder, so an interrupted search resumes where it stopped.

Many workers, on many machines, share one study through a database server: `--storage
postgresql://user@host/db` (or `OPTUNA_STORAGE`, the variable Optuna's own CLI reads) and `--study NAME`. The first
worker creates the study and records its search space and configuration; a worker whose space or configuration
differs is refused with the difference named. Every worker's trials write their run folders under the one search
folder, which must be on a filesystem every worker sees (NFS, a cluster's shared disk): the worker that scores
test opens the best trial's model there. Each running trial beats a heartbeat; a trial whose worker died
(killed, its machine lost) is marked failed once its heartbeat is `2 x heartbeat` seconds old and run again, with
the same parameters, by the next worker to start a trial. Pruning compares a trial with every worker's trials
(they are all in the study). The budget `--trials` counts completed and pruned trials of the whole study; a
worker stops starting trials once it is reached (trials already running finish, so a study can end a little over).
Test stays blind until the study is done: the worker that finds nothing running and nothing waiting scores the
best trial on test, once (a claim file in the search folder makes it one worker); `afinar search --finish` does it
from any machine.

    <output_dir>/search-<name>/
      study.db          the Optuna study (resume, parallel workers)
      trials/trial-N/   each trial's run folder (models of all but the best are removed)
      trials.csv        one row per trial: parameters, seed, state, validation metric, seconds
      best_config.yaml  the best trial's configuration, ready for `afinar train`
      search.json       best trial, its single test score, and the table
      history.png, importance.png, summary.md, report.html (trials, plots, the best run's diagnosis)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from afinar.core.config import Config, get_value, set_value, to_yaml
from afinar.core.errors import AfinarError
from afinar.core.runs import Run, read_json, write_atomic, write_json
from afinar.evaluation.diagnosis import Diagnosis, baseline_of, diagnose
from afinar.reporting.pages import write_search_report
from afinar.reporting.trackers import log_study, tracked_run

# Defaults that make sense per strategy: full fine-tuning wants small learning rates, LoRA larger ones.
FULL_SPACE = {
    "train.learning_rate": {"type": "float", "low": 1e-5, "high": 3e-4, "log": True},
    "train.batch_size": {"type": "categorical", "choices": [16, 32]},
    "train.epochs": {"type": "int", "low": 1, "high": 3},
    "train.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
}
LORA_SPACE = {
    "train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "train.batch_size": {"type": "categorical", "choices": [16, 32]},
    "train.epochs": {"type": "int", "low": 1, "high": 3},
    "lora.r": {"type": "categorical", "choices": [4, 8, 16]},
    "lora.alpha": {"type": "categorical", "choices": [8, 16, 32]},
}
PRUNERS = ("median", "halving", "none")
STORAGE_ENV = "OPTUNA_STORAGE"
LOCAL_STUDY = "afinar"  # the study's name inside a search folder's own study.db


@dataclass
class SearchResult:
    path: Path
    best_params: dict[str, Any]
    best_validation: float
    test: dict | None
    trials: list[dict] = field(default_factory=list)
    scored: bool = True  # False: other workers' trials were still running, so test was left for the last of them


def load_space(path: str | Path | None, config: Config) -> dict[str, dict]:
    """A YAML mapping of config keys to distributions, or the default space for the configured strategy."""
    if path is None:
        return copy.deepcopy(LORA_SPACE if config.lora.enabled else FULL_SPACE)
    path = Path(path)
    if not path.is_file():
        raise AfinarError(f"search space file {path} does not exist")
    space = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(space, dict) or not space:
        raise AfinarError(f"{path}: a search space maps config keys to {{type, low, high}} or {{type, choices}}")
    probe = copy.deepcopy(config)
    for key, spec in space.items():
        kind = (spec or {}).get("type") if isinstance(spec, dict) else None
        if kind not in ("float", "int", "categorical"):
            raise AfinarError(f"{path}: {key} needs type float, int or categorical (got {kind!r})")
        needed = ("choices",) if kind == "categorical" else ("low", "high")
        missing = [k for k in needed if k not in spec]
        if missing:
            raise AfinarError(f"{path}: {key} ({kind}) needs {', '.join(missing)}")
        set_value(probe, key, spec["choices"][0] if kind == "categorical" else spec["low"])  # key exists, typed
    return space


def _suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                              log=spec.get("log", False))
    return params


def _configured_values(space: dict[str, dict], config: Config) -> dict[str, Any] | None:
    """The config's own value of every searched key, when all lie inside the space (else None)."""
    values = {}
    for key, spec in space.items():
        value = get_value(config, key)
        if spec["type"] == "categorical":
            if value not in spec["choices"]:
                return None
        else:
            if value is None or not float(spec["low"]) <= value <= float(spec["high"]):
                return None
            if spec["type"] == "int":
                if not float(value).is_integer():
                    return None
                value = int(value)
        values[key] = value
    return values


def _pruning_callback(trial, metric: str):
    """Report each validation evaluation to Optuna; stop the trial when the pruner says so."""
    import optuna
    from transformers import TrainerCallback

    class PruneOnEvaluate(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            trial.report(metrics[f"eval_{metric}"], state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {state.global_step}")

    return PruneOnEvaluate()


def _make_pruner(name: str):
    import optuna

    if name not in PRUNERS:
        raise AfinarError(f"pruner must be one of {', '.join(PRUNERS)} (got {name!r})")
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
            "none": lambda: optuna.pruners.NopPruner()}[name]()


def _plots(study, folder: Path) -> list[str]:
    """Optimization history and parameter importance as PNGs (importance needs two finished trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    written = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = [("history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2 and len({str(t.params) for t in complete}) >= 2:
        plots.append(("importance.png", ovm.plot_param_importances))
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (ValueError, RuntimeError):  # e.g. importance of parameters that never varied
            continue
        axes.figure.set_size_inches(7, 4)
        axes.figure.tight_layout()
        axes.figure.savefig(folder / name, dpi=100)
        plt.close(axes.figure)
        written.append(name)
    return written


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _storage(url: str, heartbeat_s: float):
    """An Optuna RDB storage whose trials beat a heartbeat; a trial whose worker stopped beating is failed and
    retried (same parameters) by the next worker that starts a trial."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if heartbeat_s <= 0:
        raise AfinarError(f"heartbeat must be more than 0 seconds (got {heartbeat_s})")
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=_heartbeat(heartbeat_s)[0], grace_period=_heartbeat(heartbeat_s)[1],
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except (ImportError, ModuleNotFoundError) as exc:
        raise AfinarError(f"the storage {url.split('://')[0]}:// needs its database driver: {exc}; for PostgreSQL "
                          f"pip install 'afinar[postgres]'") from None
    except Exception as exc:  # SQLAlchemy's connection errors, a malformed URL
        raise AfinarError(f"cannot open the study storage {_redacted(url)}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}") from None


def _heartbeat(seconds: float) -> tuple[int, int]:
    """Optuna's whole-second heartbeat interval, and the silence after which a trial's worker counts as dead."""
    interval = max(1, round(seconds))
    return interval, 2 * interval


def _redacted(url: str) -> str:
    """The storage URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _differences(expected: Any, found: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested mappings differ."""
    if isinstance(expected, dict) and isinstance(found, dict):
        return [difference for key in sorted(set(expected) | set(found), key=str)
                for difference in _differences(expected.get(key), found.get(key), f"{prefix}{key}.")]
    return [] if expected == found else [f"{prefix[:-1]}: study {expected!r}, this worker {found!r}"]


def _join(study, identity: dict, created: bool, wait_s: float = 30.0) -> None:
    """Record what defines the study (its creator, or an afinar search folder's own study from before studies
    recorded it), or check this worker's against it."""
    if created or (study.study_name == LOCAL_STUDY and not set(identity) & set(study.user_attrs)):
        for key, value in identity.items():
            study.set_user_attr(key, value)
        return
    deadline = time.monotonic() + wait_s
    while not set(identity) <= set(study.user_attrs):  # the creator records them just after creating the study
        if time.monotonic() > deadline:
            raise AfinarError(f"study {study.study_name} records no search space or configuration: it was not created "
                              f"by afinar search; use another --study")
        time.sleep(0.5)  # `user_attrs` reads the storage each time
    differences = [d for key in identity for d in _differences(study.user_attrs[key], identity[key], f"{key}.")]
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise AfinarError(f"this worker's search differs from study {study.study_name}'s: {shown}; run every worker "
                          f"with the same config and space, or use another --study")


def search(config: Config, trials: int = 20, space: str | Path | None = None, timeout: float | None = None,
           name: str | None = None, pruner: str | Any = "median", storage: str | None = None,
           study_name: str | None = None, heartbeat_s: float = 60.0, finish: bool = False) -> SearchResult:
    """Search `space` for the best validation metric in `trials` trials (in total, counting earlier runs of the
    same study and every worker's), then score the best trial once on test. `storage`: an Optuna database URL
    (default: `OPTUNA_STORAGE`, else SQLite in the search folder); `finish`: start no trial, only score and write
    the results of the study as it stands (its other workers done)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from afinar.tasks.registry import require, train

    task = require(config, "searches", "search")  # before any trial, so a task search cannot tune fails at once
    config.validate()
    distributions = load_space(space, config)
    configured = copy.deepcopy(config)
    task.configure(configured)  # the metric the task trains for (a tagger's `accuracy` is its entity F1)
    metric = configured.train.metric_for_best_model
    folder = Path(config.train.output_dir) / f"search-{name or 'default'}"
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    url = storage or os.environ.get(STORAGE_ENV) or f"sqlite:///{folder / 'study.db'}"
    study_name = study_name or (LOCAL_STUDY if url.startswith("sqlite") else f"afinar-{name or 'default'}")
    options = {"storage": _storage(url, heartbeat_s), "direction": "minimize" if metric == "loss" else "maximize",
               "sampler": optuna.samplers.TPESampler(seed=config.train.seed),
               "pruner": _make_pruner(pruner) if isinstance(pruner, str) else pruner}
    loading = {key: options[key] for key in ("storage", "sampler", "pruner")}
    try:
        if finish:  # scores a study that exists; never creates one
            study, created = optuna.load_study(study_name=study_name, **loading), False
        else:
            study, created = optuna.create_study(study_name=study_name, **options), True
    except KeyError:
        raise AfinarError(f"there is no study {study_name} in {_redacted(url)}; check --study and --storage") from None
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(study_name=study_name, **loading), False
    _join(study, {"space": distributions, "config": yaml.safe_load(to_yaml(config))}, created)
    write_atomic(folder / "base_config.yaml", to_yaml(config))
    baseline = _configured_values(distributions, config)
    if created and baseline is not None:  # trial 0 is the config as given: what the search must beat
        study.enqueue_trial(baseline, user_attrs={"baseline": True})

    def objective(trial) -> float:
        params = _suggest(trial, distributions)
        trial_config = copy.deepcopy(config)
        for key, value in params.items():
            set_value(trial_config, key, value)
        set_value(trial_config, "train.output_dir", str(folder / "trials"))
        set_value(trial_config, "train.run_name", f"trial-{trial.number}")
        set_value(trial_config, "checks.suspects", False)  # a trial's model is a means to a score, not for fixing data
        trial.set_user_attr("seed", trial_config.train.seed)
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("run_dir", str(folder / "trials" / f"trial-{trial.number}"))
        with tracked_run(f"trial-{trial.number}", config.train.report_to):
            result = train(trial_config, callbacks=[_pruning_callback(trial, metric)], with_test=False)
        trial.set_user_attr("seconds", result.metrics["train"]["seconds"])
        return result.metrics["validation"][metric]

    counted, busy_states = (TrialState.COMPLETE, TrialState.PRUNED), (TrialState.RUNNING, TrialState.WAITING)
    if not finish:
        with tracked_run(folder.name, config.train.report_to):
            if len(study.get_trials(deepcopy=False, states=counted)) < trials:
                study.optimize(objective, n_trials=trials, timeout=timeout, catch=(AfinarError,),
                               callbacks=[MaxTrialsCallback(trials, states=counted)])
            if study.get_trials(deepcopy=False, states=busy_states):
                # a trial still running may be a dead worker's: once its heartbeat is stale it is failed and a
                # retry waits, which this worker runs (the budget counted the trial it replaces)
                time.sleep(sum(_heartbeat(heartbeat_s)) + 1)
                optuna.storages.fail_stale_trials(study)
                waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if waiting:
                    study.optimize(objective, n_trials=len(waiting), catch=(AfinarError,))
    busy = study.get_trials(deepcopy=False, states=busy_states)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise AfinarError(f"no trial of {folder} finished (all pruned or failed); widen the space or add trials")
    best = study.best_trial
    if finish:
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:  # scoring now and again when they end would look at test twice
            raise AfinarError(f"{len(running)} trial(s) of study {study_name} are still running (workers "
                              f"{', '.join(sorted({str(t.user_attrs.get('worker')) for t in running}))}); let them "
                              f"finish, or stop them and retry after {sum(_heartbeat(heartbeat_s))} s")
    elif busy:  # the last worker to stop (or `--finish`) reads test, once
        return SearchResult(folder, best.params, best.value, None, _rows(study), scored=False)
    best_model = Path(best.user_attrs["run_dir"]) / "model"
    if not best_model.is_dir():
        raise AfinarError(f"the best trial's model ({best_model}) is not on this machine: put the search folder on a "
                          f"filesystem every worker sees, or finish on the machine that ran trial {best.number} "
                          f"({best.user_attrs.get('worker')})")
    claim = folder / f"test-claimed-trial-{best.number}-of-{len(complete)}"
    try:
        claim.open("x").write(worker_id())
    except FileExistsError:  # another worker scored this very study state: read its results
        scored = read_json(folder / "search.json") if (folder / "search.json").is_file() else {}
        return SearchResult(folder, best.params, best.value, scored.get("test") if scored.get(
            "best_trial") == best.number else None, _rows(study), scored=False)
    try:
        return _finish(config, task, study, best, folder, metric)
    except BaseException:  # scoring failed: another worker, or --finish, may try again
        claim.unlink(missing_ok=True)
        raise


def _rows(study) -> list[dict]:
    return [{"trial": t.number, "baseline": bool(t.user_attrs.get("baseline")), "state": t.state.name.lower(),
             "value": t.value, **t.params, "seed": t.user_attrs.get("seed"), "seconds": t.user_attrs.get("seconds"),
             "worker": t.user_attrs.get("worker"), "last_step": max(t.intermediate_values, default=None)}
            for t in study.trials]


def _finish(config: Config, task, study, best, folder: Path, metric: str) -> SearchResult:
    """Score the best trial on test (the one look at it) and write the search's results."""
    import optuna

    from afinar.tasks.base import NoTestSplit

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best_run = Path(best.user_attrs["run_dir"])
    for t in complete:  # keep disk use flat: only the best trial's model is needed
        if t.number != best.number:
            shutil.rmtree(Path(t.user_attrs["run_dir"]) / "model", ignore_errors=True)
    try:
        test = task.evaluate(Run.open(best_run), None, "torch", 64)  # the one and only look at the test split
    except NoTestSplit:
        test = None
    best_config = copy.deepcopy(config)
    for key, value in best.params.items():
        set_value(best_config, key, value)
    set_value(best_config, "train.run_name", None)
    write_atomic(folder / "best_config.yaml", f"# afinar train {folder / 'best_config.yaml'}\n"
                 f"# best of {len(complete)} completed trials (validation {metric} {best.value:.4f})\n"
                 + to_yaml(best_config))
    rows = _rows(study)
    _write_table(folder / "trials.csv", rows)
    plots = _plots(study, folder)
    diagnosis = diagnose(Run.open(best_run).read_log(),
                         baseline_of(read_json(best_run / "metrics.json")["validation"]))
    result = SearchResult(folder, best.params, best.value, test, rows)
    write_json(folder / "search.json", {"metric": metric, "best_trial": best.number, "best_params": best.params,
                                        "best_validation": best.value, "best_run": str(best_run),
                                        "study": study.study_name, "workers": sorted({
                                            r["worker"] for r in rows if r["worker"]}),
                                        "test_scored_once_for": f"trial-{best.number}", "test": test,
                                        "diagnosis": dataclasses.asdict(diagnosis), "trials": rows, "plots": plots})
    write_atomic(folder / "summary.md", _summary(result, metric, best.number, diagnosis,
                                                 tuple(dict.fromkeys((metric, *task.card_metrics)))))
    write_search_report(folder)
    log_study(config.train.report_to, folder.name, best.params, best.value, test, folder)
    return result


def _write_table(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def _summary(result: SearchResult, metric: str, best_number: int, diagnosis: Diagnosis,
             test_keys: tuple[str, ...]) -> str:
    keys = list(result.best_params)
    baseline = next((row for row in result.trials if row["baseline"]), None)
    lines = [f"# Hyperparameter search ({len(result.trials)} trials)", "",
             f"Objective: validation {metric}. The test split was read once, for trial {best_number}: "
             + (", ".join(f"test {key} {result.test[key]:.4f}" for key in test_keys
                          if isinstance(result.test.get(key), float)) + "."
                if result.test else "no test split.")]
    if baseline is not None and baseline["value"] is not None:
        lines.append(f"Trial {baseline['trial']} is the configuration as given: validation {metric} "
                     f"{baseline['value']:.4f}; the best trial's is {result.best_validation:.4f}.")
    lines += [f"Best trial's curves: {diagnosis.verdict}. " + " ".join(diagnosis.reasons), "",
              "| trial | state | validation | " + " | ".join(keys) + " | seconds |",
              "|---" * (len(keys) + 4) + "|"]
    for row in result.trials:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        trial = f"{row['trial']} (as configured)" if row["baseline"] else str(row["trial"])
        lines.append(f"| {trial} | {row['state']} | {value} | "
                     + " | ".join(_fmt(row.get(k)) for k in keys) + f" | {seconds} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
