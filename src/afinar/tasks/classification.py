"""Sequence classification (`task: classification`): one label per text or sentence pair. Trained by the run
lifecycle; after training its runs predict, evaluate, export to ONNX, serve `/predict` and rank suspect labels.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from transformers import DataCollatorWithPadding

from afinar.core.config import Config, DataArgs
from afinar.core.errors import AfinarError
from afinar.core.models import load_classifier
from afinar.core.runs import Run, read_json, reads_pairs, write_json
from afinar.data import sources as data_lib
from afinar.data.cache import dataset_digest
from afinar.data.checks import checked_splits, format_report
from afinar.evaluation.metrics import classification_report, logits_to_predictions, trainer_metrics, with_interval
from afinar.inference.predictors import Predictor, check_inputs, load_predictor
from afinar.reporting import pages
from afinar.reporting.hub import EVALUATIONS
from afinar.tasks.base import NoTestSplit, Task
from afinar.training.lifecycle import TaskData

log = logging.getLogger(__name__)


def _score(trainer, ds, label_names: list[str]) -> dict:
    """Full metrics for one tokenized split, from the model `trainer` holds now (the best one)."""
    output = trainer.predict(ds, metric_key_prefix="eval")
    report = classification_report(np.asarray(output.label_ids), np.asarray(output.predictions), label_names)
    report["loss"] = float(output.metrics.get("eval_loss", float("nan")))
    return report


def class_weights(setting: str, labels: list[int], label_names: list[str]) -> list[float] | None:
    """`train.class_weights` as one weight per class: none -> None; balanced -> rows / (classes x count), as
    scikit-learn's `compute_class_weight("balanced")`; `name=weight,...` -> those, 1 for classes not named."""
    if setting == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(label_names))
    if setting == "balanced":
        if (counts == 0).any():
            missing = label_names[int(np.argmin(counts))]
            raise AfinarError(f"train.class_weights=balanced: class {missing!r} has no training rows")
        return (len(labels) / (len(label_names) * counts)).tolist()
    return named_weights(setting, label_names)


def named_weights(setting: str, label_names: list[str]) -> list[float]:
    """`name=weight,...` as one weight per label, 1 for labels not named."""
    weights = dict.fromkeys(label_names, 1.0)
    for item in setting.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in weights:
            raise AfinarError(f"train.class_weights names {name!r}, which is not a label ({', '.join(label_names)})")
        weights[name] = float(value)
    return [weights[name] for name in label_names]


class WeightedCrossEntropy:
    """`Trainer`'s `compute_loss_func`: cross-entropy with a weight per class (a batch mean, like the model's)."""

    def __init__(self, weights: list[float]):
        self.weights = weights

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch

        logits = outputs["logits"]
        weight = torch.tensor(self.weights, dtype=torch.float32, device=logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), labels, weight=weight)


class Classification(Task):
    """Checked splits, a sequence classifier, padded batches, accuracy / macro-F1 / per-class scores."""

    name = "classification"
    lora_task_type = "SEQ_CLS"
    compute_metrics = staticmethod(trainer_metrics)
    preprocess_logits_for_metrics = staticmethod(logits_to_predictions)
    pipeline_tag = "text-classification"
    card_metrics = ("accuracy", "macro_f1")
    searches = True
    compares = True
    ranks_suspects = True

    def configure(self, config: Config) -> list[str]:
        return []

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        splits, report = checked_splits(config, tokenizer, with_test)
        log.info("data checks:\n%s", format_report(report))
        tokenized = {name: data_lib.tokenize(ds, tokenizer, config.data.max_length) for name, ds in splits.items()}
        weights = class_weights(config.train.class_weights, splits.train["label"], splits.label_names)
        manifest = {"class_weights": None if weights is None else dict(zip(splits.label_names, weights)),
                    "data": {"sources": splits.sources, "sha256": splits.fingerprints,
                             "rows": {name: len(ds) for name, ds in splits.items()}, "labels": splits.label_names,
                             "pairs": data_lib.has_pairs(splits.train),
                             "digests": {name: dataset_digest(ds) for name, ds in splits.items()}}}
        return TaskData(tokenized["train"], tokenized["validation"], tokenized.get("test"), manifest,
                        list(splits.notes), report.to_dict(), (splits, report),
                        None if weights is None else WeightedCrossEntropy(weights))

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData):
        splits, _ = data.extra
        return load_classifier(config.model, splits.label_names, tokenizer, model_path)

    def collator(self, tokenizer):
        return DataCollatorWithPadding(tokenizer)

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        label_names = data.extra[0].label_names
        scores = {"validation": _score(trainer, data.validation, label_names)}
        if data.test is not None:
            scores["test"] = _score(trainer, data.test, label_names)
        return scores

    def after_training(self, run: Run, config: Config, model_path: str, data: TaskData, metrics: dict) -> None:
        """Suspect labels: the training rows the trained model disagrees with most (`checks.suspects`)."""
        if not config.checks.suspects:
            return
        from afinar.evaluation.suspects import SUSPECTS_FILE, disagreeing, trained_model_suspects, write_suspects

        splits, _ = data.extra
        started = time.perf_counter()
        suspects = trained_model_suspects(run.model_dir, config, splits.train, splits.label_names,
                                          run.trained_in_bf16())
        write_suspects(suspects, run.path / SUSPECTS_FILE)
        metrics["suspects"] = {"file": SUSPECTS_FILE, "disagree": len(disagreeing(suspects)),
                               "scored": len(suspects), "seconds": round(time.perf_counter() - started, 1)}
        log.info("suspect labels: %d of %d training rows disagree with the trained model; all ranked in %s",
                 metrics["suspects"]["disagree"], len(suspects), run.path / SUSPECTS_FILE)

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str:
        splits, report = data.extra
        lines = [f"# {config.model.name} on {config.data.source}", "",
                 f"- task: {config.task}; labels: {', '.join(splits.label_names)}",
                 f"- rows: train {len(splits.train):,}, validation {len(splits.validation):,}, "
                 f"test {len(splits.test) if splits.test is not None else 0:,}",
                 f"- training: {metrics['train']['seconds']:.0f} s, {metrics['train']['steps']} steps, "
                 f"{metrics['train']['samples_per_second']:.1f} samples/s, "
                 f"{metrics['train']['trainable_parameters']:,} trainable parameters"
                 + (" (LoRA)" if config.lora.enabled else ""), ""]
        lines += ["| split | accuracy [95% CI] | macro-F1 [95% CI] | majority baseline | n |", "|---|---|---|---|---|"]
        for split in ("validation", "test"):
            if split in metrics:
                m = metrics[split]
                lines.append(f"| {split} | {with_interval(m, 'accuracy')} | {with_interval(m, 'macro_f1')} | "
                             f"{m['majority_baseline']:.4f} | {m['n']:,} |")
        lines += ["", "Notes:"] + [f"- {note}" for note in splits.notes]
        lines += ["", "## Data checks (before splitting and subsets)", "", "```", format_report(report), "```", ""]
        return "\n".join(lines)


    # ---------------------------------------------------------------- after training

    def check(self, config: Config) -> tuple[str, dict]:
        from afinar.data.checks import check

        report = check(config)
        return format_report(report, examples=3), report.to_dict()

    def result_lines(self, metrics: dict) -> list[str]:
        return [f"{split}: accuracy {with_interval(m, 'accuracy')}  macro-F1 {with_interval(m, 'macro_f1')}  "
                f"(95% bootstrap intervals; majority baseline {m['majority_baseline']:.4f}, n={m['n']:,})"
                for split in ("validation", "test") if (m := metrics.get(split))]

    def evaluation_lines(self, report: dict) -> list[str]:
        width = max(len(name) for name in report["labels"])
        return [f"{report['data']}: accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
                f"(majority baseline {report['majority_baseline']:.4f}, n={report['n']:,})",
                f"{'class':<{width}}  precision  recall  f1      support",
                *[f"{name:<{width}}  {row['precision']:.4f}     {row['recall']:.4f}  {row['f1']:.4f}  {row['support']}"
                  for name, row in report["per_class"].items()],
                f"confusion matrix (rows: true, columns: predicted): {report['confusion_matrix']}"]

    def metrics_html(self, metrics: dict) -> str:
        return pages.metrics_table(metrics, ["accuracy", "macro_f1", "majority_baseline", "loss"])

    def report_sections(self, run: Run, metrics: dict) -> list[str]:
        sections = pages.confusion_sections(metrics)
        if metrics.get("suspects"):
            sections.append(pages.suspects_html(run.path, metrics["suspects"]))
        return sections

    def load_predictor(self, run: Run, backend: str = "auto") -> Predictor:
        return load_predictor(run.path, backend)

    def evaluate(self, run: Run, data: str | Path | None, backend: str, batch_size: int) -> dict:
        """Re-score on a labelled file, or on the run's own test split; a file's score is kept with the run and
        shown on its model card. The default backend is torch, so the score reproduces the one training measured."""
        config = run.config()
        classifier = self.load_predictor(run, backend)
        if data is not None:
            ds = data_lib.load_labelled_file(data, DataArgs(text_column=config.data.text_column,
                                                            text_pair_column=config.data.text_pair_column,
                                                            label_column=config.data.label_column,
                                                            encoding=config.data.encoding,
                                                            max_text_chars=config.data.max_text_chars),
                                             classifier.labels)
        else:
            ds = data_lib.load_splits(config.data, config.train.seed).test
            if ds is None:
                raise NoTestSplit(f"the data of {run.path} has no test split; pass a labelled file with --data")
        texts = data_lib.inputs(ds)
        check_inputs(reads_pairs(run), texts)
        predictions = classifier.scores(texts, batch_size).argmax(axis=1)
        report = classification_report(np.asarray(ds["label"]), predictions, classifier.labels)
        report["data"] = str(data) if data is not None else "the run's test split"
        report["backend"] = classifier.backend
        if data is not None:
            earlier = [e for e in (read_json(run.path / EVALUATIONS) if (run.path / EVALUATIONS).is_file() else [])
                       if e["data"] != str(data)]
            write_json(run.path / EVALUATIONS, earlier + [{
                "data": str(data), "sha256": data_lib.sha256_file(Path(data)), "n": report["n"],
                "accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "ci95": report["ci95"]}])
            self.write_card(run)
        return report

    def export(self, run: Run, int8: bool, out: str | Path | None) -> dict:
        from afinar.inference.export import export_run

        return export_run(run, int8=int8, out=out)

    def export_lines(self, record: dict) -> list[str]:
        lines = []
        for name, row in record["backends"].items():
            extra = "" if name == "torch" else (f" ({row['accuracy_change_points']:+.2f} points, labels agree "
                                                f"{row['label_agreement']:.1%}, max |logit diff| "
                                                f"{row['max_abs_logit_diff']:.1e})")
            lines.append(f"{name}: accuracy {row['accuracy']:.4f}{extra}, {row['texts_per_second']:.0f} texts/s on "
                         f"{record['check']['texts']} validation texts")
        return lines
