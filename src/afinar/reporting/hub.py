"""The Hugging Face hub side of a run: a model card for every saved `model/` and `afinar push`.

The card is built with `huggingface_hub.ModelCard` / `ModelCardData`: metadata (base model, datasets, licence,
pipeline tag, tags, a `model-index` with the test metrics and their bootstrap intervals) and a body with the
training settings, the data checks' actions, the learning-curve diagnosis, cross-dataset scores from
`afinar evaluate --data`, intended use and limitations. `push` uploads `model/` (card included) with `HfApi`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from afinar.core import assets
from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run, read_json

log = logging.getLogger(__name__)

EVALUATIONS = "evaluations.json"  # `afinar evaluate --data` results kept in the run folder


def _base_model(config: Config) -> tuple[str, str | None]:
    """The base model's hub id (embedded names map to where they came from) and licence when known."""
    asset = assets.MODELS.get(config.model.name)
    if asset is not None:
        return asset.hub_id, asset.license
    return config.model.name, None


def _dataset(config: Config) -> str:
    return assets.DATASET_HUB_IDS.get(config.data.source, config.data.source)


METRIC_TYPES = {"macro_f1": "f1", "micro_f1": "f1"}  # afinar's metric keys -> the model-index's metric types


def _eval_results(config: Config, metrics: dict, task_type: str, keys: tuple[str, ...]) -> list:
    from huggingface_hub import EvalResult

    dataset = _dataset(config)
    results = []
    test = metrics.get("test") or {}
    for key in keys:
        name = METRIC_TYPES.get(key, key)
        if test.get(key) is None:
            continue
        interval = (test.get("ci95") or {}).get(key)
        results.append(EvalResult(task_type=task_type, dataset_type=dataset, dataset_name=dataset,
                                  dataset_split="test",
                                  metric_type=name, metric_name=key.replace("_", "-"), metric_value=float(test[key]),
                                  metric_config=f"95% bootstrap interval {interval}" if interval else None))
    return results


def card_text(run: Run, config: Config, metrics: dict, pipeline_tag: str | None, card_metrics: tuple[str, ...],
              usage: str) -> str:
    """The model card's markdown (front matter included), built with `huggingface_hub.ModelCard`. The task
    supplies its `pipeline_tag` (None: no `pipeline()` can load the model, so the card claims none), the test
    metrics its model-index lists, and the paragraph on how to load the model."""
    from huggingface_hub import ModelCard, ModelCardData

    from afinar.evaluation.diagnosis import baseline_of, diagnose

    base, licence = _base_model(config)
    data = ModelCardData(base_model=base, datasets=[_dataset(config)], license=licence or "other",
                         pipeline_tag=pipeline_tag, tags=["afinar", config.task], model_name=run.path.name,
                         eval_results=_eval_results(config, metrics, pipeline_tag or config.task, card_metrics)
                         or None)
    manifest = run.manifest()
    train = metrics.get("train") or {}
    lines = [f"# {run.path.name}", "",
             f"{config.model.name} ({base}) fine-tuned by [afinar](https://pypi.org/project/afinar/) for "
             f"{config.task} on {config.data.source}.", "", "## Results", ""]
    for split in ("validation", "test"):
        scored = metrics.get(split) or {}
        shown = [f"{key} {scored[key]:.4f}" + (f" (95% CI {scored['ci95'][key][0]:.4f}-{scored['ci95'][key][1]:.4f})"
                                               if (scored.get("ci95") or {}).get(key) else "")
                 for key in ("accuracy", "macro_f1", "micro_f1", "loss", "perplexity") if scored.get(key) is not None]
        if shown:
            lines.append(f"- {split} ({scored.get('n', '?')} rows): {', '.join(shown)}")
    evaluations = read_json(run.path / EVALUATIONS) if (run.path / EVALUATIONS).is_file() else []
    if evaluations:
        lines += ["", "Other data (`afinar evaluate --data`):", ""]
        lines += [f"- {e['data']}: accuracy {e['accuracy']:.4f}, macro-F1 {e['macro_f1']:.4f} ({e['n']:,} rows)"
                  for e in evaluations]
    verdict = diagnose(run.read_log(), baseline_of(metrics.get("validation")))
    lines += ["", "## Training", "",
              f"- {train.get('steps', 0):,} steps in {train.get('seconds', 0):.0f} s; "
              f"{train.get('trainable_parameters', 0):,} of {train.get('total_parameters', 0):,} parameters trained"
              + (" (LoRA, merged)" if config.lora.enabled else ""),
              f"- learning rate {config.train.learning_rate}, batch {config.train.batch_size}, epochs "
              f"{config.train.epochs}, seed {config.train.seed}, precision "
              f"{(manifest.get('precision') or {}).get('precision', config.train.precision)}",
              f"- learning curves: {verdict.verdict}" + (f" ({verdict.reasons[0]})" if verdict.reasons else ""),
              "- versions: " + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items()), "",
              "## Data", ""]
    lines += [f"- {note}" for note in manifest.get("notes", [])] or ["- no changes to the data"]
    lines += ["", "The full configuration is the run's `config.yaml`; data hashes are in its `manifest.json`.", "",
              "## How to load it", "", usage, "",
              "## Intended use and limitations", "",
              f"Trained for {config.task} on the data above; it inherits the base model's limitations and the "
              "data's biases, and its scores hold for data like the test split, not beyond it. Check it on your "
              "own data (`afinar evaluate RUN --data FILE`) before relying on it.", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_model_card(run: Run, config: Config, metrics: dict, pipeline_tag: str | None,
                     card_metrics: tuple[str, ...], usage: str) -> Path | None:
    """`model/README.md` for a finished run's model (None when the run saved no model); see `card_text`."""
    if not run.model_dir.is_dir():
        return None
    path = run.model_dir / "README.md"
    path.write_text(card_text(run, config, metrics, pipeline_tag, card_metrics, usage), encoding="utf-8")
    return path


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, api: Any = None) -> str:
    """Upload a finished run's `model/` (weights, tokenizer, card) to the hub repository `repo_id`; returns its
    URL. `api` replaces `huggingface_hub.HfApi` (tests pass a recorder). The caller refreshes the card first
    (`afinar.api.push` does), so it shows evaluations made since training."""
    from huggingface_hub import HfApi

    run = Run.open(run_dir)
    run.require_finished()
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise AfinarError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it on a machine that reaches "
                          "huggingface.co")
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(run.model_dir),
                          commit_message=f"afinar: {run.path.name}")
    except Exception as exc:  # network, auth and name errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AfinarError(f"push to {repo_id} failed: {first}; check the name and your token (HF_TOKEN or "
                          f"`huggingface-cli login`)") from None
    return f"https://huggingface.co/{repo_id}"
