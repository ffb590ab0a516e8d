"""Predictions from a saved model: texts sorted by length, tokenized in batches, padded per batch.

Sorting by length before batching means a batch of short tweets is not padded to the longest text in the
request; results are put back into input order before they are returned. That loop is written once
(`Predictor`); a backend only says how one padded batch becomes logits:

    torch       `Classifier`: the run's `model/` in PyTorch eager mode
    torch-bf16  the same under bf16 autocast: several times faster on CPUs with native bf16 (AVX512-BF16, AMX)
                and on GPUs, slower where bf16 is emulated
    onnx        `OnnxClassifier`: `<run>/onnx/model.onnx` in ONNX Runtime (written by `afinar export`)
    onnx-int8   the same with `model.int8.onnx`, dynamically quantized weights (`afinar export --int8`)
    auto        the fastest backend whose accuracy change, recorded by the export's check (`afinar export`
                scores all of them on validation texts), is within `AUTO_TOLERANCE_POINTS`; torch when there is
                no usable export
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from afinar.core.config import ModelArgs
from afinar.core.errors import AfinarError
from afinar.core.models import load_classifier, load_tokenizer
from afinar.core.runs import Run, read_json
from afinar.data.sources import padded_batches

log = logging.getLogger("afinar")

BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8", "auto")
ONNX_DIR = "onnx"  # inside a run folder
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
AUTO_TOLERANCE_POINTS = 0.5  # largest accuracy drop (percentage points) `auto` accepts from an exported backend


@dataclass
class Prediction:
    text: str
    label: str  # the most probable label
    scores: dict[str, float]
    labels: list[str] | None = None  # multi-label models: every label at or above its threshold

    def to_dict(self) -> dict:
        return {"text": self.text, "label": self.label, "scores": self.scores,
                **({"labels": self.labels} if self.labels is not None else {})}

    def line(self) -> str:
        """`afinar predict`'s line: the label (or labels), every score, the text."""
        scores = "  ".join(f"{k}={v:.3f}" for k, v in self.scores.items())
        return f"{self.label if self.labels is None else ','.join(self.labels) or '(none)'}\t{scores}\t{self.text}"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Predictor:
    """The batching loop every backend shares; subclasses set `tokenizer`, `labels`, `max_length` and
    implement `_logits` for one padded batch (numpy arrays in, float32 logits out)."""

    backend = ""
    tokenizer = None
    labels: list[str]
    max_length: int

    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Raw logits, one row per text, in input order."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for index, batch in padded_batches(self.tokenizer, texts, batch_size, self.max_length, "np"):
            out[index] = self._logits(dict(batch))
        return out

    def scores(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per text, in input order."""
        return softmax(self.logits(texts, batch_size))

    def predict(self, texts: list[str], batch_size: int = 64) -> list[Prediction]:
        probabilities = self.scores(texts, batch_size)
        return [Prediction(text, self.labels[int(row.argmax())],
                           {label: float(p) for label, p in zip(self.labels, row)})
                for text, row in zip(texts, probabilities)]


class Classifier(Predictor):
    """A fine-tuned sequence classifier loaded from a model folder (a run's `model/`), run in PyTorch; with `bf16`
    under bf16 autocast (weights stay fp32; matmuls run in bf16, softmax and layer norms in fp32, as in training).
    `device` "cuda" serves scoring after training on a GPU machine; predict and serve run on the CPU."""

    def __init__(self, model_dir: str | Path, max_length: int = 128, allow_pickle: bool = False, bf16: bool = False,
                 device: str = "cpu"):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise AfinarError(f"{model_dir} holds no saved model (config.json missing)")
        args = ModelArgs(name=str(model_dir), allow_pickle=allow_pickle)
        self.tokenizer = load_tokenizer(args)
        config_labels = self._labels(model_dir)
        self.model = load_classifier(args, config_labels, self.tokenizer).eval().to(device)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_length = max_length
        self.bf16 = bf16
        self.device = device

    @property
    def backend(self) -> str:
        return "torch-bf16" if self.bf16 else "torch"

    @staticmethod
    def _labels(model_dir: Path) -> list[str]:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        return [config.id2label[i] for i in range(config.num_labels)]

    @torch.inference_mode()
    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(**{k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}).logits
        return logits.float().cpu().numpy()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxModel:
    """An export (`afinar export`) in ONNX Runtime on the CPU, one intra-op thread per core: its session, labels
    and tokenizer, and logits for a padded batch (per text, or per token of a token classifier)."""

    def __init__(self, onnx_dir: str | Path, int8: bool = False):
        import onnxruntime as ort

        self.backend = "onnx-int8" if int8 else "onnx"
        onnx_dir = Path(onnx_dir)
        self.path = onnx_dir / ONNX_FILES[self.backend]
        if not self.path.is_file():
            raise AfinarError(f"{self.path} not found; export it with `afinar export <run>{' --int8' if int8 else ''}`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = available_cores()
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            self.labels = list(read_json(onnx_dir / "labels.json"))
            self.tokenizer = load_tokenizer(ModelArgs(name=str(onnx_dir)))
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid models
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AfinarError(f"{self.path} cannot be loaded ({first}); export it again with `afinar export`") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: np.asarray(batch[name]).astype(np.int64, copy=False) for name in self.input_names}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)


class OnnxClassifier(Predictor):
    """An exported classifier run in ONNX Runtime (`OnnxModel`)."""

    def __init__(self, onnx_dir: str | Path, max_length: int = 128, int8: bool = False):
        self.onnx = OnnxModel(onnx_dir, int8)
        self.backend, self.path, self.session = self.onnx.backend, self.onnx.path, self.onnx.session
        self.labels, self.tokenizer = self.onnx.labels, self.onnx.tokenizer
        self.max_length = max_length

    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.onnx.logits(batch)


def _locate(path: Path) -> tuple[Path | None, Path | None, dict]:
    """(model_dir, onnx_dir, defaults) for a run folder, a run's `model/`, or an export folder (`--out`)."""
    if (path / "config.yaml").is_file():
        run = Run.open(path)
        run.require_finished()
        config = run.config()
        return run.model_dir, run.path / ONNX_DIR, {"max_length": config.data.max_length,
                                                    "allow_pickle": config.model.allow_pickle}
    if (path / "export.json").is_file() or (path / "labels.json").is_file():
        record = read_json(path / "export.json") if (path / "export.json").is_file() else {}
        model_dir = Path(record["model_dir"]) if record.get("model_dir") else None
        return model_dir, path, {"max_length": record.get("max_length", 128)}
    if (path / "config.json").is_file():
        return path, path.parent / ONNX_DIR, {}
    raise AfinarError(f"{path} is not a run folder, a model folder or an ONNX export folder")


def choose_backend(onnx_dir: Path | None) -> tuple[str, str]:
    """What `auto` picks from an export's recorded check, and why: the fastest of torch and the exports whose
    accuracy is within `AUTO_TOLERANCE_POINTS` of torch's, by the texts/s measured at export (on the exporting
    machine: int8 wins on CPUs with VNNI/AMX and can lose without them; export again where you serve)."""
    record_file = onnx_dir / "export.json" if onnx_dir is not None else None
    if record_file is None or not record_file.is_file():
        return "torch", "no export check (run `afinar export <run> --int8`)"
    record = read_json(record_file)
    backends = record.get("backends", {})
    speeds = {"torch": backends.get("torch", {}).get("texts_per_second", 0.0)}
    for backend in ("torch-bf16", "onnx", "onnx-int8"):
        change = backends.get(backend, {}).get("accuracy_change_points")
        if change is not None and change >= -AUTO_TOLERANCE_POINTS:
            speeds[backend] = backends[backend].get("texts_per_second", 0.0)
    chosen = max(speeds, key=lambda name: speeds[name])
    measured = ", ".join(f"{name} {speed:.0f}" for name, speed in speeds.items())
    if chosen == "torch":
        return "torch", (f"no backend within {AUTO_TOLERANCE_POINTS} accuracy points is faster (texts/s at export: "
                         f"{measured})")
    return chosen, (f"fastest within {AUTO_TOLERANCE_POINTS} accuracy points (texts/s at export: {measured}); "
                    f"accuracy change {backends[chosen]['accuracy_change_points']:+.2f} points on "
                    f"{record['check']['texts']} validation texts")


def load_predictor(path: str | Path, backend: str = "auto", max_length: int | None = None,
                   allow_pickle: bool | None = None) -> Predictor:
    """A predictor for a run folder (or a run's `model/`, or an export folder) on the chosen backend.

    An explicit `onnx` / `onnx-int8` whose file is missing or broken is an error; `auto` then falls back to
    torch and logs why.
    """
    if backend not in BACKENDS:
        raise AfinarError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    model_dir, onnx_dir, defaults = _locate(Path(path))
    max_length = max_length or defaults.get("max_length", 128)
    allow_pickle = defaults.get("allow_pickle", False) if allow_pickle is None else allow_pickle
    chosen = backend
    if backend == "auto":
        chosen, why = choose_backend(onnx_dir)
        log.info("backend auto -> %s: %s", chosen, why)
    if chosen.startswith("onnx"):
        try:
            return OnnxClassifier(onnx_dir, max_length, int8=chosen == "onnx-int8")
        except AfinarError as exc:
            if backend != "auto":
                raise
            log.warning("backend auto: %s; falling back to torch", exc)
    if model_dir is None:
        raise AfinarError(f"{path} holds only an ONNX export and no PyTorch model; pass --backend onnx")
    return Classifier(model_dir, max_length, allow_pickle, bf16=chosen == "torch-bf16")


def check_inputs(pairs: bool, texts: list) -> None:
    """A pair model given single texts (or the reverse) would score garbage without a word: refuse."""
    wrong = next((i for i, t in enumerate(texts) if isinstance(t, tuple) != pairs), None)
    if wrong is not None:
        raise AfinarError(f"input {wrong}: this model reads "
                          + ("sentence pairs; give two texts (--pair, or two columns)" if pairs
                             else "one text, not a pair"))
