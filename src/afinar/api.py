"""afinar's Python API: one function per thing a user does, each the body of a CLI subcommand. Every function that
touches a run asks the run's task (`tasks.registry`) what it means; none branches on a task's name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from afinar.core.config import Config, ModelArgs, load_config
from afinar.core.errors import AfinarError
from afinar.core.models import resolve
from afinar.core.runs import Run, reads_pairs
from afinar.inference.generation import (
    MAX_NEW_TOKENS,
    SEED,
    TEMPERATURE,
    TOP_P,
    GenerationFormat,
    Generator,
)
from afinar.inference.gguf_export import DTYPES as GGUF_DTYPES
from afinar.tasks import registry
from afinar.training.lifecycle import TrainResult

EXPORT_FORMATS = ("onnx", "gguf")


def _config(config: Config | str | None, overrides: list[str] | None = None) -> Config:
    return config if isinstance(config, Config) else load_config(config, overrides)


def _finished(run_dir: str | Path) -> Run:
    run = Run.open(run_dir)
    run.require_finished()
    return run


def train(config: Config | str | None = None, overrides: list[str] | None = None) -> TrainResult:
    """Train what `config` describes (a `Config`, or a YAML path plus `key=value` overrides) with its task; returns
    a `TrainResult` (run folder, task, metrics)."""
    return registry.train(_config(config, overrides))


def check(config: Config | str | None = None) -> tuple[str, dict]:
    """The data checks training would run, as text and as a record, for the config's task; nothing is changed."""
    config = _config(config)
    return registry.for_config(config).check(config)


def evaluate(run_dir: str | Path, data: str | Path | None = None, batch_size: int = 64,
             backend: str = "torch") -> dict:
    """Re-score a finished run on a labelled file, or on its own test split when none is given."""
    run = _finished(run_dir)
    return registry.for_run(run).evaluate(run, data, backend, batch_size)


def predict(run_dir: str | Path, texts: list, batch_size: int = 64, backend: str = "auto") -> list:
    """Labels and scores (`inference.predictors.Prediction`s) for texts, or (text, text_pair) tuples for a model
    trained on sentence pairs."""
    from afinar.inference.predictors import check_inputs

    run = _finished(run_dir)
    check_inputs(reads_pairs(run), texts)  # before the model loads
    return registry.for_run(run).load_predictor(run, backend).predict(texts, batch_size)


def _generator_source(model: str | Path) -> tuple[ModelArgs, GenerationFormat, bool]:
    """What `generate` samples from: a finished run whose task generates (its model folder, the format it was
    trained with, whether it trained in bf16), or any causal LM (an embedded name, a folder or a hub id) with the
    format saved beside it or a base model's."""
    folder = Path(model).expanduser()
    if not (folder / "config.yaml").is_file():
        args = ModelArgs(name=str(model))
        return args, GenerationFormat.load(resolve(args)), False
    run = _finished(folder)
    task = registry.for_run(run)
    if not task.generates:
        raise AfinarError(f"{folder} is a {task.name} run, which does not generate; give a run that does, or a "
                          f"causal LM")
    return ModelArgs(name=str(run.model_dir)), GenerationFormat.load(run.model_dir, task.chat_prompts), \
        run.trained_in_bf16()


def answers_as_chat(model: str | Path) -> bool:
    """Whether `generate` answers prompts to `model` as chat messages (a run whose task trained on them)."""
    return _generator_source(model)[1].chat


def generate(model: str | Path, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
             top_p: float = TOP_P, seed: int = SEED, as_chat: bool = False) -> str:
    """Sample a continuation of `prompt` from a run whose task generates, or from any causal LM (embedded name,
    folder, hub id); returns the new text. The prompt is rendered as the model was trained to see it (a run that
    trained on chat messages answers it as its user text); `as_chat=True` answers it as a user message through the
    chat template whatever the model. The same prompt and seed give the text the OpenAI-compatible server gives."""
    args, trained, bf16 = _generator_source(model)
    generator = Generator(args, dataclasses.replace(trained, chat=True) if as_chat else trained, bf16)
    prompt_ids = generator.format.prompt_ids(generator.tokenizer, prompt)
    return generator.generate(prompt_ids, max_new_tokens, temperature, top_p, seed).text


def export(run_dir: str | Path, int8: bool = False, out: str | Path | None = None, format: str = "onnx",
           dtype: str | None = None) -> dict:
    """Export a finished run, checked before it is kept: ONNX (`int8` adds a quantized copy) for the tasks that
    predict, GGUF (`dtype` f16, the default, or q8_0) with an Ollama Modelfile for the tasks that generate."""
    if format not in EXPORT_FORMATS:
        raise AfinarError(f"export format must be one of {', '.join(EXPORT_FORMATS)} (got {format!r})")
    if format == "gguf" and int8:
        raise AfinarError("--int8 quantizes an ONNX export; a GGUF is quantized with --dtype q8_0")
    if format == "onnx" and dtype is not None:
        raise AfinarError("--dtype applies to --format gguf; an ONNX export is fp32, with --int8 for an int8 copy")
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise AfinarError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)} (got {dtype!r})")
    run = _finished(run_dir)
    task = registry.for_run(run)
    if format == "gguf":
        return task.export_gguf(run, dtype or GGUF_DTYPES[0], out)
    return task.export(run, int8, out)


def forgetting(run_dir: str | Path) -> dict:
    """Re-measure a finished run's forgetting against its base model."""
    run = _finished(run_dir)
    return registry.for_run(run).remeasure_forgetting(run)


def report(folder: str | Path) -> Path:
    """(Re)write `report.html` of a run, a comparison, a search or a curve folder (and a run's model card)."""
    from afinar.reporting import pages

    folder = Path(folder)
    for record, write in (("comparison.json", pages.write_comparison_report), ("search.json",
                          pages.write_search_report), ("curve.json", pages.write_curve_report)):
        if (folder / record).is_file():
            return write(folder)
    run = _finished(folder)
    return registry.for_run(run).write_outputs(run)


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a finished run's model folder, its card refreshed first, to the Hugging Face hub."""
    from afinar.reporting import hub

    run = _finished(run_dir)
    registry.for_run(run).write_card(run)
    return hub.push(run.path, repo_id, private=private)


def compare(config: Config | str | None = None, strategies: str | list[str] = "all", out_dir: str | None = None,
            resume: bool = False):
    """Run several strategies on the same splits and recommend one (see `experiments.compare`); call it under
    `if __name__ == "__main__":`, since each strategy runs in a spawned process."""
    from afinar.experiments.compare import compare as run_comparison

    return run_comparison(_config(config), strategies, out_dir, resume=resume)


def curve(config: Config | str | None = None, strategy: str = "full", sizes: list[int] | None = None,
          out_dir: str | None = None, resume: bool = False, per_class: int = 16):
    """How much data do I need? `strategy` on growing nested subsets of train (see `experiments.curve`)."""
    from afinar.experiments.curve import learning_curve

    return learning_curve(_config(config), strategy, sizes, out_dir, per_class, resume)


def search(config: Config | str | None = None, **options):
    """Optuna search on validation, test read once for the best trial (see `experiments.search.search`)."""
    from afinar.experiments.search import search as run_search

    return run_search(_config(config), **options)


def serve(run_dir: str | Path, **options) -> None:
    """Serve a run over HTTP (see `serving.app.serve`)."""
    from afinar.serving.app import serve as run_server

    run_server(run_dir, **options)
