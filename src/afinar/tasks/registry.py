"""The task registry: a task's name -> the object that says what the task means (`tasks.base.Task`), and the
one training entry point every command uses.

This is the only module that reads a config's or a run's task name. The built-in tasks are imported on first
use (a command that never trains or predicts does not pay for torch); `register` adds a task of your own::

    from afinar.tasks import registry
    registry.register(MyTask())      # then `task: my_task` in a config trains, predicts, serves and reports it
"""

from __future__ import annotations

import copy
import importlib
import logging

from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run, is_main_process, read_json
from afinar.reporting.trackers import log_results
from afinar.tasks.base import Task
from afinar.training.lifecycle import TrainResult, run_task

log = logging.getLogger(__name__)

BUILT_IN = {"classification": "afinar.tasks.classification:Classification",
            "multilabel": "afinar.tasks.multilabel:MultiLabel",
            "causal_lm": "afinar.tasks.causal_lm:CausalLM",
            "sft": "afinar.tasks.sft:SFT",
            "preference": "afinar.tasks.preference:Preference",
            "token_classification": "afinar.tasks.token_classification:TokenClassification",
            "question_answering": "afinar.tasks.question_answering:QuestionAnswering"}
_registered: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make `task` available under `task.name` (replacing a task of that name)."""
    if not task.name:
        raise AfinarError(f"{type(task).__name__} has no name; set its `name`")
    _registered[task.name] = task
    return task


def get(name: str) -> Task:
    if name not in _registered and name in BUILT_IN:
        module, attribute = BUILT_IN[name].split(":")
        register(getattr(importlib.import_module(module), attribute)())
    if name not in _registered:
        raise AfinarError(f"task {name!r} is not known; use one of {', '.join(names())} (or register your own)")
    return _registered[name]


def names() -> list[str]:
    return sorted(set(BUILT_IN) | set(_registered))


def resolve_name(config: Config) -> str:
    """The config's task; classification data given as several 0/1 columns (`data.label_columns`) is multi-label."""
    if config.task == "classification" and config.data.label_columns:
        return "multilabel"
    return config.task


def for_config(config: Config) -> Task:
    return get(resolve_name(config))


def for_run(run: Run) -> Task:
    return get(run.config().task)


def require(config: Config, capability: str, command: str) -> Task:
    """The config's task, or a one-line error (before any work) when `command` does not apply to it."""
    task = for_config(config)
    if not getattr(task, capability):
        applicable = [name for name in names() if getattr(get(name), capability)]
        raise AfinarError(f"afinar {command} does not apply to task {task.name!r}"
                          + (f" (it applies to {', '.join(applicable)})" if applicable else ""))
    return task


def train(config: Config, callbacks: list | None = None, with_test: bool = True) -> TrainResult:
    """Train what `config` describes with its task (the run lifecycle), then write the run's model card and
    report and hand its results to the configured trackers. `with_test=False` never reads the test split
    (search trials); `callbacks` are extra `TrainerCallback`s."""
    config = copy.deepcopy(config)  # the caller's config stays as given
    task = for_config(config)
    config.task = task.name  # the run folder records the task that trained
    result = run_task(config, task, callbacks, with_test)
    if is_main_process():
        run = Run.open(result.run_dir)
        log.info("report: %s", task.write_outputs(run))
        data_report = run.path / "data_report.json"
        log_results(run.path, run.config().train.report_to, result.metrics,
                    read_json(data_report) if data_report.is_file() else None)
    return result
