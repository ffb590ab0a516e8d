"""ONNX export of a finished run, checked against PyTorch before anything may use it.

    <run>/onnx/              (or --out DIR)
      model.onnx             fp32 logits; dynamic batch and sequence axes; inputs as the tokenizer gives them
      model.int8.onnx        dynamic int8 quantization of model.onnx (`--int8`): int8 weights, one scale per
                             output channel, activations quantized per batch on the fly, no calibration data
      labels.json            class names in logit order
      tokenizer files        the run's tokenizer, so the folder predicts on its own
      export.json            the check: logits vs PyTorch, accuracy and speed of each backend (torch, torch-bf16,
                             onnx, onnx-int8) on validation texts, which `load_predictor(backend="auto")` reads

Exporter: the TorchScript tracer (`torch.onnx.export(..., dynamo=False)`). In torch 2.13 the dynamo exporter
gave the same logits and the same ONNX Runtime speed on MiniLM, GPT-2 and Llama, but needs two more packages
(onnxscript, onnx-ir), took 3x longer (11 s vs 3.6 s for MiniLM) and writes weights to a separate `.data`
file by default; the tracer also works on every torch the project accepts (>= 2.4). A tracer records the one
path the example batch takes through Python branches, so the example is a right-padded batch of two lengths:
the attention-mask path and, for decoders, the last-non-pad-token pooling are what gets recorded, and the
check below, on batches of mixed lengths, catches any shape that was frozen by mistake.

Fusion: BERT-family encoders are traced with eager attention and rewritten by ONNX Runtime's transformer
optimizer into fused Attention / EmbedLayerNormalization / SkipLayerNormalization / BiasGelu operators (MiniLM:
6 / 1 / 12 / 6). On the quickstart model, 3,534 test tweets at batch 32 on a 2-core AVX-512 CPU without VNNI:
fp32 169.7 tweets/s fused vs 141.3 unfused, int8 205.3 vs 189.6, test accuracy 0.8016 fp32 either way. An SDPA
trace fuses no attention (the mask pattern is not recognised), so it gains little. Decoders are exported unfused.

int8: per-channel weight scales kept MiniLM's labels closer to fp32 than one scale per tensor (98.0% vs 96.4%
agreement on 500 tweets) at the same speed; ONNX Runtime's quantization pre-processing changed nothing.
Activation scales are computed per batch, so an int8 score depends slightly on the texts batched with it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from afinar.core.errors import AfinarError
from afinar.core.models import save_tokenizer
from afinar.core.runs import Run, write_json
from afinar.data import sources as data_lib
from afinar.data.cache import dataset_digest
from afinar.data.checks import checked_splits
from afinar.inference.predictors import ONNX_DIR, ONNX_FILES, Classifier, OnnxClassifier

log = logging.getLogger(__name__)

OPSET = 17
CHECK_TEXTS = 500  # validation texts scored by every backend at export
CHECK_BATCH = 32
FP32_TOLERANCE = 1e-4  # largest |logit difference| between model.onnx and PyTorch
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Logits(torch.nn.Module):
    """The classifier as a function of positional tensors to logits, which is what the tracer records."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


FUSABLE = {"bert": "bert"}  # model_type -> ONNX Runtime transformer-optimizer type, for the architectures checked


@contextlib.contextmanager
def _root_logging_quiet():
    """ONNX Runtime's tools log warnings per node to the root logger: silence them, then restore what was set."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def export_onnx(classifier, path: Path, per_token: bool = False) -> list[str]:
    """Trace `classifier` (its `model`, `tokenizer`, `max_length`) into `path` (fp32); returns the input names. Any
    exporter failure is one line. Architectures in `FUSABLE` are traced with eager attention, the pattern ONNX
    Runtime's optimizer fuses. `per_token`: logits per token (a token classifier), their sequence axis dynamic."""
    tokenizer, model = classifier.tokenizer, classifier.model.float().eval()
    if model.config.model_type in FUSABLE:
        model.set_attn_implementation("eager")
    example = tokenizer.pad(data_lib.encode(tokenizer, ["a", "a longer text, so that one row is padded"],
                                            classifier.max_length), return_tensors="pt")
    names = [name for name in INPUTS if name in example]
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | \
        {"logits": {0: "batch", 1: "sequence"} if per_token else {0: "batch"}}
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings are about branches the check verifies
            torch.onnx.export(_Logits(model, names).eval(), tuple(example[n] for n in names), str(path),
                              input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=OPSET,
                              **legacy)
    except Exception as exc:  # the exporter raises many types for unsupported operators and models
        path.unlink(missing_ok=True)
        raise AfinarError(f"cannot export {type(model).__name__} to ONNX: {_first_line(exc)}") from None
    return names


def fuse(path: Path, config) -> dict[str, int]:
    """Rewrite a `FUSABLE` export in place with ONNX Runtime's fused operators (Attention, EmbedLayerNormalization,
    SkipLayerNormalization, BiasGelu), typed by symbolic shape inference so the int8 quantizer can read it;
    returns the fused operator counts, or {} (file untouched) when attention did not fuse."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.optimizer import optimize_model

    if config.model_type not in FUSABLE:
        return {}
    try:
        with _root_logging_quiet():  # the optimizer logs each pattern it tries
            optimized = optimize_model(str(path), model_type=FUSABLE[config.model_type],
                                       num_heads=config.num_attention_heads, hidden_size=config.hidden_size,
                                       opt_level=1)
    except Exception as exc:  # an unfused export is still a correct one
        log.warning("ONNX Runtime's optimizer could not fuse %s (%s); keeping it unfused", path, _first_line(exc))
        return {}
    counts = {name: n for name, n in optimized.get_fused_operator_statistics().items() if n}
    if not counts.get("Attention"):
        return {}
    onnx.save(SymbolicShapeInference.infer_shapes(optimized.model, auto_merge=True), str(path))
    return counts


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _root_logging_quiet():  # the quantizer logs every tensor it skips to the root logger
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    except Exception as exc:
        target.unlink(missing_ok=True)
        raise AfinarError(f"cannot quantize {source} to int8: {_first_line(exc)}") from None


def _check_texts(run: Run, tokenizer, labels: list[str], limit: int) -> tuple[list[str], np.ndarray]:
    """The first `limit` validation texts of the run and their label ids in model order: the very rows training
    validated on (read, checked and carved as training did, and verified against the digest in the manifest)."""
    config = run.config()
    recorded = run.manifest().get("data", {})
    try:
        splits, _ = checked_splits(config, tokenizer, with_test="test" in recorded.get("rows", {"test": 0}))
    except AfinarError as exc:
        raise AfinarError(f"the export is checked on the run's validation texts, which cannot be loaded: {exc}") \
            from None
    expected = recorded.get("digests", {}).get("validation")
    if expected is not None and dataset_digest(splits.validation) != expected:
        raise AfinarError(f"the validation rows of {run.path} differ from the ones it was trained with (the data "
                          f"files or the code that reads them changed); the export cannot be checked against them")
    ds = splits.validation.select(range(min(limit, len(splits.validation))))
    index = {name: i for i, name in enumerate(labels)}
    return data_lib.inputs(ds), np.array([index[splits.label_names[y]] for y in ds["label"]])


def _score(predictor, texts: list[str], gold: np.ndarray) -> tuple[np.ndarray, dict]:
    started = time.perf_counter()
    logits = predictor.logits(texts, CHECK_BATCH)
    seconds = time.perf_counter() - started
    return logits, {"accuracy": float((logits.argmax(axis=1) == gold).mean()),
                    "texts_per_second": round(len(texts) / seconds, 1)}  # rough: measured during the check


def export_run(run: Run | str | Path, int8: bool = False, out: str | Path | None = None, check_texts: int = CHECK_TEXTS) -> dict:
    """Export a finished run to ONNX (and int8 with `int8`), check it against PyTorch on validation texts.

    fp32 must reproduce PyTorch's logits within 1e-4, else nothing is left behind and an AfinarError says
    by how much it missed; int8 records its label agreement and accuracy change, for `--backend auto`.
    """
    run = run if isinstance(run, Run) else Run.open(run)
    run.require_finished()
    config = run.config()
    classifier = Classifier(run.model_dir, config.data.max_length, config.model.allow_pickle)
    texts, gold = _check_texts(run, classifier.tokenizer, classifier.labels, check_texts)
    out_dir = _fresh_folder(run, out, classifier)
    fp32, names, fused, seconds = _export_fp32(classifier, out_dir)
    reference, torch_row = _score(classifier, texts, gold)
    logits, onnx_row = _score(OnnxClassifier(out_dir, config.data.max_length), texts, gold)
    diff = float(np.abs(logits - reference).max())
    if not diff <= FP32_TOLERANCE:  # also catches NaN
        fp32.unlink()
        raise AfinarError(f"ONNX export of {run.path} does not match PyTorch: max |logit difference| {diff:.2e} "
                          f"> {FP32_TOLERANCE:g} on {len(texts)} validation texts; nothing was exported")
    backends = {"torch": torch_row, "onnx": _compare(onnx_row, torch_row, logits, reference, fp32, seconds)}
    classifier.bf16 = True  # the same model under bf16 autocast
    logits, bf16_row = _score(classifier, texts, gold)
    backends["torch-bf16"] = _compare(bf16_row, torch_row, logits, reference)
    if int8:
        quantized, started = out_dir / ONNX_FILES["onnx-int8"], time.perf_counter()
        quantize_int8(fp32, quantized)
        seconds = time.perf_counter() - started
        logits, int8_row = _score(OnnxClassifier(out_dir, config.data.max_length, int8=True), texts, gold)
        backends["onnx-int8"] = _compare(int8_row, torch_row, logits, reference, quantized, seconds)
    record = {**_record(run, names, fused, classifier.labels),
              "check": {"texts": len(texts), "split": "validation", "batch_size": CHECK_BATCH,
                        "fp32_tolerance": FP32_TOLERANCE},
              "backends": backends, "time": time.time()}
    write_json(out_dir / "export.json", record)
    return record


def _fresh_folder(run: Run, out: str | Path | None, predictor) -> Path:
    """The export folder, emptied of an earlier export's files, with the predictor's tokenizer and labels."""
    out_dir = Path(out) if out is not None else run.path / ONNX_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*ONNX_FILES.values(), "export.json"]:  # nothing from an earlier export may outlive this one
        (out_dir / stale).unlink(missing_ok=True)
    save_tokenizer(predictor.tokenizer, out_dir)
    write_json(out_dir / "labels.json", predictor.labels)
    return out_dir


def _export_fp32(predictor, out_dir: Path, per_token: bool = False) -> tuple[Path, list[str], dict, float]:
    """model.onnx traced and fused: its path, input names, fused operators and the seconds it took."""
    fp32, started = out_dir / ONNX_FILES["onnx"], time.perf_counter()
    names = export_onnx(predictor, fp32, per_token)
    fused = fuse(fp32, predictor.model.config)
    return fp32, names, fused, time.perf_counter() - started


def _record(run: Run, names: list[str], fused: dict, labels: list[str]) -> dict:
    """What every export.json says of the export itself."""
    return {"run": str(run.path.resolve()), "model_dir": str(run.model_dir.resolve()),
            "exporter": "torch.onnx.export (TorchScript tracer, dynamo=False)", "opset": OPSET, "inputs": names,
            "fused_operators": fused, "labels": labels, "max_length": run.config().data.max_length,
            "versions": {name: version(name) for name in ("torch", "transformers", "onnx", "onnxruntime")}}


def _compare(row: dict, torch_row: dict, logits: np.ndarray, reference: np.ndarray, file: Path | None = None,
             seconds: float = 0.0) -> dict:
    written = {"file": file.name, "megabytes": round(file.stat().st_size / 2**20, 1),
               "seconds_to_write": round(seconds, 2)} if file is not None else {}
    return {**row, **written, "accuracy_change_points": round(100 * (row["accuracy"] - torch_row["accuracy"]), 3),
            "label_agreement": float((logits.argmax(axis=1) == reference.argmax(axis=1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits - reference).max())}



def export_tagger(run: Run, sentences: list[list[str]], int8: bool = False, out: str | Path | None = None) -> dict:
    """Export a finished token-classification run to ONNX (and int8 with `int8`), checked on `sentences` (the
    run's validation sentences, which its task reads): fp32 word probabilities within `FP32_TOLERANCE` of
    PyTorch's, else nothing is left behind; each backend's tag agreement and speed in `export.json`."""
    from afinar.inference.spans import EntityTagger

    run.require_finished()
    config = run.config()
    tagger = EntityTagger(run.model_dir, config.data.max_length, config.tagging.overlap)
    out_dir = _fresh_folder(run, out, tagger)
    fp32, names, fused, seconds = _export_fp32(tagger, out_dir, per_token=True)

    def scored(predictor) -> tuple[np.ndarray, dict]:
        began = time.perf_counter()
        probabilities = np.concatenate(predictor.word_probabilities(sentences)) if sentences else np.zeros((0, 1))
        return probabilities, {"sentences_per_second": round(len(sentences) / (time.perf_counter() - began), 1)}

    reference, torch_row = scored(tagger)
    backends = {"torch": torch_row}
    for backend, file in (("onnx", fp32), *((("onnx-int8", out_dir / ONNX_FILES["onnx-int8"]),) if int8 else ())):
        if backend == "onnx-int8":
            started = time.perf_counter()
            quantize_int8(fp32, file)
            seconds = time.perf_counter() - started
        probabilities, row = scored(EntityTagger(None, config.data.max_length, config.tagging.overlap,
                                                 backend=backend, onnx_dir=out_dir))
        diff = float(np.abs(probabilities - reference).max()) if len(reference) else 0.0
        if backend == "onnx" and not diff <= FP32_TOLERANCE:
            fp32.unlink()
            raise AfinarError(f"ONNX export of {run.path} does not match PyTorch: max |probability difference| "
                              f"{diff:.2e} > {FP32_TOLERANCE:g} on {len(sentences)} validation sentences; nothing was "
                              f"exported")
        backends[backend] = {**row, "file": file.name, "megabytes": round(file.stat().st_size / 2**20, 1),
                             "seconds_to_write": round(seconds, 2), "max_abs_probability_diff": diff,
                             "tag_agreement": float((probabilities.argmax(1) == reference.argmax(1)).mean())
                             if len(reference) else 1.0}
    record = {**_record(run, names, fused, tagger.labels),
              "check": {"sentences": len(sentences), "words": int(len(reference)), "split": "validation",
                        "fp32_tolerance": FP32_TOLERANCE},
              "backends": backends, "time": time.time()}
    write_json(out_dir / "export.json", record)
    return record
