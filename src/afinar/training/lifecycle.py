"""One run's life, the same for every task:

    copy of the config -> tokenizer -> task data (checked, tokenized) -> unset settings scaled to the data
    (`scaling`) -> run folder and manifest -> model -> LoRA, then frozen layers -> `Trainer` (CPU speed-ups,
    precision) -> fit, resuming when asked -> best model saved as stock `transformers` modules -> validation
    and test scored once -> log, metrics, summary

A task (`tasks.classification.Classification`, `tasks.causal_lm.CausalLM`, ...) is a small object that supplies only
what differs (`TrainingTask`); adding one adds a module, not a branch here. What a finished run means to the
world (model card, report, trackers) is the caller's: `tasks.registry.train` writes it.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.core.models import load_tokenizer, resolve
from afinar.core.runs import Run, is_main_process, machine, peak_memory, versions, wait_for_every_rank
from afinar.training.scaling import scale_to_data

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    task: str
    metrics: dict

    @property
    def test_accuracy(self) -> float | None:
        return (self.metrics.get("test") or {}).get("accuracy")


@dataclass
class TaskData:
    """What a task prepared: tokenized datasets for `Trainer`, the manifest's record of the data, notes on what
    was changed (the lifecycle puts the task's config changes first), the data-check report (written to
    data_report.json) and anything the task keeps for its score, summary and after-training measurements."""

    train: Any
    validation: Any
    test: Any | None
    manifest: dict
    notes: list[str] = field(default_factory=list)
    report: dict | None = None
    extra: Any = None
    compute_loss: Any = None  # replaces the model's own loss in `Trainer` (e.g. class weights); None: the model's
    compute_metrics: Any = None  # replaces the task's `compute_metrics` when scoring needs the data (tag names,
    #                              the windows of each question); None: the task's


class TrainingTask(Protocol):
    name: str  # the config's `task`
    lora_task_type: str  # peft's TaskType
    compute_metrics: Any  # `Trainer` hooks (None: loss only)
    preprocess_logits_for_metrics: Any
    best_model_metrics: tuple[str, ...]  # what `train.metric_for_best_model` may name for this task

    def configure(self, config: Config) -> list[str]:
        """Adjust the (copied) config to what the task needs; returns a note per change."""

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        """Read, check and tokenize the data; input errors surface here, before a run folder exists."""

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData): ...

    def collator(self, tokenizer): ...

    def trainer_class(self):
        """The `Trainer` to train with: None for the lifecycle's own (`training.trainer.LengthBucketTrainer`), or a
        subclass of it that also derives from another library's trainer (TRL's DPO)."""

    def trainer_arguments(self, config: Config) -> dict:
        """Extra fields for that trainer's `arguments_class` (a `TrainingArguments` subclass)."""

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        """Metrics per held-out split ("validation", and "test" when there is one) of the model `trainer` holds."""

    def after_training(self, run: Run, config: Config, model_path: str, data: TaskData, metrics: dict) -> None:
        """Anything measured on the saved model (e.g. forgetting); adds to `metrics`. Runs on the main process
        only; under torchrun the other ranks wait."""

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str: ...


def run_task(config: Config, task: TrainingTask, callbacks: list | None = None, with_test: bool = True) -> TrainResult:
    """Train `config.model` on `config.data` as `task` describes; the best validation checkpoint is scored once on
    test. `with_test=False` never reads the test split (search trials); `callbacks` are extra `TrainerCallback`s.
    The caller's config is never changed: the run works on a copy, and its folder holds the resolved one."""
    from transformers import set_seed  # the training stack loads here, not when a task module is imported

    from afinar.training.trainer import (
        adapt_model,
        build_trainer,
        fit,
        last_checkpoint,
        save_best,
        trainable_parameters,
    )

    config = copy.deepcopy(config)
    changed = task.configure(config)
    config.lora.enabled = bool(config.lora.enabled)  # resolved: a task that wants LoRA by default set it above
    config.validate()
    if config.train.metric_for_best_model not in task.best_model_metrics:
        raise AfinarError(f"train.metric_for_best_model={config.train.metric_for_best_model} is not measured by task "
                          f"{task.name!r}; use one of {', '.join(task.best_model_metrics)}")
    set_seed(config.train.seed)
    model_path = resolve(config.model)
    tokenizer = load_tokenizer(config.model, model_path)
    preparing = time.perf_counter()
    data = task.prepare(config, model_path, tokenizer, with_test)
    changed += scale_to_data(config, len(data.train), task.lora_task_type)
    data.notes[:0] = changed  # what the task and the data size changed in the config come first
    run = Run.create(config)
    with run.recording(config.train.keep_checkpoints):
        if data.report is not None:
            run.write("data_report.json", data.report)
        run.update_manifest({"task": task.name, "versions": versions(), "machine": machine(),
                             "model": {"name": config.model.name, "path": model_path}, **data.manifest,
                             "notes": data.notes})
        data_seconds = time.perf_counter() - preparing
        log.info("data read, checked and tokenized in %.1f s", data_seconds)
        model = adapt_model(task.load_model(config, model_path, tokenizer, data), config, task.lora_task_type)
        trainable, total = trainable_parameters(model)
        trainer = build_trainer(run, config.train, model, tokenizer, data.train, data.validation,
                                task.collator(tokenizer), data.compute_metrics or task.compute_metrics,
                                task.preprocess_logits_for_metrics,
                                callbacks, data.compute_loss, task.trainer_class(), task.trainer_arguments(config))
        checkpoint = last_checkpoint(run) if config.train.resume else None
        if config.train.resume:
            log.info("resuming from %s", checkpoint or "the start: no complete checkpoint yet")
        started = time.perf_counter()
        output = fit(trainer, run, checkpoint)
        seconds = time.perf_counter() - started
        metrics = {"train": {"seconds": seconds, "data_seconds": data_seconds, "steps": trainer.state.global_step,
                             "samples_per_second": output.metrics.get("train_samples_per_second", 0.0),
                             "loss": output.metrics.get("train_loss"),
                             "best_checkpoint": trainer.state.best_model_checkpoint,
                             "trainable_parameters": trainable, "total_parameters": total, **peak_memory()},
                   **task.score(trainer, data)}
        save_best(run, trainer, tokenizer, config.lora.enabled)
        run.write_log(trainer.state.log_history)
        del trainer, model  # free memory before what the task measures on the saved model
        wait_for_every_rank()  # rank 0 alone saved the model; what is measured on it is measured there once
        if is_main_process():
            task.after_training(run, config, model_path, data, metrics)
            run.write("metrics.json", metrics)
            run.write("summary.md", task.summary(config, data, metrics))
    return TrainResult(run.path, task.name, metrics)
