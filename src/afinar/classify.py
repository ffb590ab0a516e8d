"""Sequence classification: train -> run folder, re-evaluate a run, predict with a run.

`train` reads as the recipe it is: config -> data -> tokenizer/model -> Trainer -> best model -> test once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import DataCollatorWithPadding, set_seed

from afinar import data as data_lib
from afinar.checks import DataReport, checked_splits, format_report
from afinar.config import Config, DataArgs
from afinar.errors import AfinarError
from afinar.inference import Prediction, Predictor, load_predictor
from afinar.metrics import classification_report, logits_to_predictions, trainer_metrics
from afinar.models import load_classifier, load_tokenizer, resolve
from afinar.report import write_run_report
from afinar.runs import Run, is_main_process, machine, versions
from afinar.training import (apply_lora, build_trainer, fit, freeze_lower_layers, last_checkpoint, save_best,
                             trainable_parameters)

log = logging.getLogger(__name__)


class NoTestSplit(AfinarError):
    """Raised by `evaluate` when a run's data has no test split and no file was given."""


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict

    @property
    def test_accuracy(self) -> float | None:
        return (self.metrics.get("test") or {}).get("accuracy")


def _score(trainer, ds, label_names: list[str]) -> dict:
    """Full metrics for one tokenized split, from the model `trainer` holds now (the best one)."""
    output = trainer.predict(ds, metric_key_prefix="eval")
    report = classification_report(np.asarray(output.label_ids), np.asarray(output.predictions), label_names)
    report["loss"] = float(output.metrics.get("eval_loss", float("nan")))
    return report


def _summary(config: Config, splits: data_lib.Splits, metrics: dict, report: DataReport) -> str:
    lines = [f"# {config.model.name} on {config.data.source}", "",
             f"- task: {config.task}; labels: {', '.join(splits.label_names)}",
             f"- rows: train {len(splits.train):,}, validation {len(splits.validation):,}, "
             f"test {len(splits.test) if splits.test is not None else 0:,}",
             f"- training: {metrics['train']['seconds']:.0f} s, {metrics['train']['steps']} steps, "
             f"{metrics['train']['samples_per_second']:.1f} samples/s, "
             f"{metrics['train']['trainable_parameters']:,} trainable parameters"
             + (" (LoRA)" if config.lora.enabled else ""), ""]
    lines += ["| split | accuracy | macro-F1 | majority baseline | n |", "|---|---|---|---|---|"]
    for split in ("validation", "test"):
        if split in metrics:
            m = metrics[split]
            lines.append(f"| {split} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['majority_baseline']:.4f} "
                         f"| {m['n']:,} |")
    lines += ["", "Notes:"] + [f"- {note}" for note in splits.notes]
    lines += ["", "## Data checks (before splitting and subsets)", "", "```", format_report(report), "```", ""]
    return "\n".join(lines)


def train(config: Config, callbacks: list | None = None, with_test: bool = True) -> TrainResult:
    """Fine-tune `config.model` on `config.data`; the best validation checkpoint is scored once on test.

    `with_test=False` never reads the test split (hyperparameter-search trials); `callbacks` are extra
    `TrainerCallback`s (e.g. a pruning hook)."""
    config.validate()
    set_seed(config.train.seed)
    model_path = resolve(config.model)
    tokenizer = load_tokenizer(config.model, model_path)
    preparing = time.perf_counter()
    splits, report = checked_splits(config, tokenizer, with_test)
    log.info("data checks:\n%s", format_report(report))
    run = Run.create(config)
    with run.recording(config.train.keep_checkpoints):
        run.write("data_report.json", report.to_dict())
        run.update_manifest({
            "versions": versions(), "machine": machine(), "model": {"name": config.model.name, "path": model_path},
            "data": {"sources": splits.sources, "sha256": splits.fingerprints,
                     "rows": {name: len(ds) for name, ds in splits.items()}, "labels": splits.label_names},
            "notes": splits.notes})
        tokenized = {name: data_lib.tokenize(ds, tokenizer, config.data.max_length) for name, ds in splits.items()}
        data_seconds = time.perf_counter() - preparing
        log.info("data read, checked and tokenized in %.1f s", data_seconds)
        model = load_classifier(config.model, splits.label_names, tokenizer, model_path)
        freeze_lower_layers(model, config.train.freeze_layers)
        if config.lora.enabled:
            model = apply_lora(model, config.lora, "SEQ_CLS")
        trainable, total = trainable_parameters(model)
        trainer = build_trainer(run, config.train, model, tokenizer, tokenized["train"], tokenized["validation"],
                                DataCollatorWithPadding(tokenizer), trainer_metrics, logits_to_predictions,
                                callbacks)
        started = time.perf_counter()
        checkpoint = last_checkpoint(run) if config.train.resume else None
        if config.train.resume:
            log.info("resuming from %s", checkpoint or "the start: no complete checkpoint yet")
        output = fit(trainer, run, checkpoint)
        seconds = time.perf_counter() - started
        metrics = {"train": {"seconds": seconds, "data_seconds": data_seconds, "steps": trainer.state.global_step,
                             "samples_per_second": output.metrics.get("train_samples_per_second", 0.0),
                             "loss": output.metrics.get("train_loss"), "best_checkpoint":
                             trainer.state.best_model_checkpoint, "trainable_parameters": trainable,
                             "total_parameters": total},
                   "validation": _score(trainer, tokenized["validation"], splits.label_names)}
        if "test" in tokenized:
            metrics["test"] = _score(trainer, tokenized["test"], splits.label_names)
        save_best(run, trainer, tokenizer, config.lora.enabled)
        run.write_log(trainer.state.log_history)
        run.write("metrics.json", metrics)
        run.write("summary.md", _summary(config, splits, metrics, report))
    if is_main_process():
        log.info("report: %s", write_run_report(run.path))
    return TrainResult(run.path, metrics)


def load_run_classifier(run_dir: str | Path, backend: str = "torch") -> tuple[Run, Predictor]:
    """A finished run's classifier on `backend` (torch | torch-bf16 | onnx | onnx-int8 | auto, see `inference`)."""
    run = Run.open(run_dir)
    run.require_finished()
    if run.config().task != "classification":
        raise AfinarError(f"{run.path} is a {run.config().task} run; evaluate and predict need a classification run")
    return run, load_predictor(run.path, backend)


def evaluate(run_dir: str | Path, data: str | Path | None = None, batch_size: int = 64,
             backend: str = "torch") -> dict:
    """Re-score a saved run on a labelled file, or on its own test split when none is given. The default
    backend is torch, so the score reproduces the one training measured."""
    run, classifier = load_run_classifier(run_dir, backend)
    config = run.config()
    if data is not None:
        ds = data_lib.load_labelled_file(data, DataArgs(text_column=config.data.text_column,
                                                        label_column=config.data.label_column,
                                                        encoding=config.data.encoding,
                                                        max_text_chars=config.data.max_text_chars),
                                         classifier.labels)
    else:
        ds = data_lib.load_splits(config.data, config.train.seed).test
        if ds is None:
            raise NoTestSplit(f"the data of {run.path} has no test split; pass a labelled file with --data")
    predictions = classifier.scores(ds["text"], batch_size).argmax(axis=1)
    report = classification_report(np.asarray(ds["label"]), predictions, classifier.labels)
    report["data"] = str(data) if data is not None else "the run's test split"
    report["backend"] = classifier.backend
    return report


def predict(run_dir: str | Path, texts: list[str], batch_size: int = 64, backend: str = "auto") -> list[Prediction]:
    _, classifier = load_run_classifier(run_dir, backend)
    return classifier.predict(texts, batch_size)
