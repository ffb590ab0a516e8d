"""What a task is: the training hooks the run lifecycle calls (`training.lifecycle.TrainingTask`) and everything
the task means once a run has finished: how its runs print, report, describe themselves on a model card,
predict, evaluate, generate, export and re-measure, and which experiments apply to them.

Every command asks the run's task (`tasks.registry`) instead of testing its name, so a new task is one module
that subclasses `Task` and is registered; a capability it lacks is a one-line error naming the task, raised
before any work is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.reporting import hub, pages
from afinar.training.lifecycle import TaskData


class NoTestSplit(AfinarError):
    """Raised by `Task.evaluate` when a run's data has no test split and no file was given."""


def held_out_predictions(trainer, data: TaskData):
    """(split, `trainer.predict` output) for validation and test (when there is one), in row order, for a task that
    decodes each split itself (windows to sentences or questions). `Trainer`'s `compute_metrics` is cleared
    first: it decodes validation's windows and would misread any other split's."""
    trainer.compute_metrics = None
    for name, ds in (("validation", data.validation), ("test", data.test)):
        if ds is not None:
            yield name, trainer.predict(ds, metric_key_prefix="eval")


class Task:
    """Defaults for everything after training; a task overrides what it supports."""

    name: str = ""  # the config's `task`
    lora_task_type: str = ""  # peft's TaskType
    compute_metrics: Any = None  # `Trainer` hooks (None: loss only)
    preprocess_logits_for_metrics: Any = None
    best_model_metrics: tuple[str, ...] = ("accuracy", "macro_f1", "loss")  # `train.metric_for_best_model` choices

    pipeline_tag: str | None = None  # the model card's `pipeline_tag`: None when no `pipeline()` can load the model
    card_metrics: tuple[str, ...] = ("loss",)  # test metrics the card's model-index lists
    generates: bool = False  # served by the OpenAI-compatible API and `afinar generate`
    chat_prompts: bool = False  # a prompt is answered as a user message through the chat template
    searches: bool = False  # `afinar search` tunes its runs on validation (`train.metric_for_best_model`)
    compares: bool = False  # `afinar compare` and `afinar curve` build classifiers from this task's data
    ranks_suspects: bool = False  # `afinar check --suspects` ranks its training rows by a cross-validated model

    # ---------------------------------------------------------------- training (the lifecycle's hooks)

    def configure(self, config: Config) -> list[str]:
        return []

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        raise NotImplementedError

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData):
        raise NotImplementedError

    def collator(self, tokenizer):
        raise NotImplementedError

    def trainer_class(self):
        return None  # the lifecycle's own `Trainer`

    def trainer_arguments(self, config: Config) -> dict:
        return {}

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        raise NotImplementedError

    def after_training(self, run: Run, config: Config, model_path: str, data: TaskData, metrics: dict) -> None:
        """Anything measured on the saved model, on the main process only (the others wait at a barrier)."""

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str:
        return f"# {config.model.name} on {config.data.source} ({self.name})\n"

    # ---------------------------------------------------------------- after training

    def unsupported(self, what: str) -> AfinarError:
        return AfinarError(f"{what} does not apply to task {self.name!r}")

    def check(self, config: Config) -> tuple[str, dict]:
        """`afinar check`: the data report as text, and as a record for --json."""
        raise self.unsupported("afinar check")

    def result_lines(self, metrics: dict) -> list[str]:
        """What `afinar train` prints after a run: one line per held-out split."""
        return [f"{split}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics[split].items() if isinstance(v, float))
                for split in ("validation", "test") if metrics.get(split)]

    def evaluation_lines(self, report: dict) -> list[str]:
        """What `afinar evaluate` prints of `evaluate`'s report."""
        return [f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}"
                for key, value in report.items() if isinstance(value, (int, float, str))]

    def metrics_html(self, metrics: dict) -> str:
        """The report's metrics table."""
        return pages.metrics_table(metrics, [key for key in ("loss", "accuracy", "macro_f1")
                                             if key in (metrics.get("validation") or {})])

    def report_sections(self, run: Run, metrics: dict) -> list[str]:
        """The report's sections after the learning curves (task-specific figures and examples)."""
        return []

    def card_usage(self, run: Run) -> str:
        """The model card's paragraph on how to load the model."""
        if self.pipeline_tag is None:
            use = "generate" if self.generates else "predict"
            return f"Load it with afinar: `afinar {use} {run.path.name} ...` or `afinar serve {run.path.name}`."
        return (f"A stock `transformers` folder: `pipeline(\"{self.pipeline_tag}\", model=\"model/\")` loads it, "
                f"as do `afinar predict` and `afinar serve`.")

    def write_card(self, run: Run) -> None:
        """The model card (`model/README.md`) from the run's folder: rewritten by `afinar push` and an evaluation
        on other data too, so it shows what was measured since training."""
        hub.write_model_card(run, run.config(), run.metrics(), self.pipeline_tag, self.card_metrics,
                             self.card_usage(run))

    def write_outputs(self, run: Run) -> Path:
        """The model card and `report.html` of a finished run, from its folder; returns the report's path. Written
        after training (`registry.train`) and again by `afinar report`."""
        self.write_card(run)
        metrics = run.metrics()
        return pages.write_run_report(run.path, self.metrics_html(metrics), self.report_sections(run, metrics))

    def load_predictor(self, run: Run, backend: str = "auto"):
        """The predictor `evaluate`, `predict` and `/predict` use (`inference.predictors.Predictor`'s interface)."""
        raise AfinarError(f"{run.path} is a {self.name} run: it does not predict labels, so evaluate, predict and "
                          f"/predict do not apply" + ("; use afinar generate or afinar serve" if self.generates
                                                      else ""))

    def evaluate(self, run: Run, data: str | Path | None, backend: str, batch_size: int) -> dict:
        """Re-score a finished run on a labelled file, or its own test split."""
        raise self.unsupported("afinar evaluate")

    def export(self, run: Run, int8: bool, out: str | Path | None) -> dict:
        """`afinar export`: ONNX (and int8 with `int8`), checked against PyTorch."""
        raise AfinarError(f"{self.unsupported('afinar export')} (ONNX)"
                          + ("; export it for llama.cpp and Ollama with --format gguf" if self.generates else ""))

    def export_gguf(self, run: Run, dtype: str, out: str | Path | None) -> dict:
        """`afinar export --format gguf`: a GGUF file and an Ollama Modelfile, for a run whose task generates."""
        raise AfinarError(f"{run.path} is a {self.name} run: GGUF holds a model that generates text, which this "
                          f"task's does not; export it to ONNX: afinar export {run.path}")

    def export_lines(self, record: dict) -> list[str]:
        """What `afinar export` prints of `export`'s (or `export_gguf`'s) record: one line per backend."""
        return [f"{name}: " + "  ".join(f"{k} {v}" for k, v in row.items()) for name, row in record["backends"].items()]

    def remeasure_forgetting(self, run: Run) -> dict:
        raise self.unsupported("afinar forgetting")
