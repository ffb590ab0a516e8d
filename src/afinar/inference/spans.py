"""Predictions that are spans of the input text: entities of a token-classification model, answers of an
extractive question-answering model. Each comes back as `Span(text, type, start, end, score)`, with `start` and
`end` character offsets into the string the caller sent (`text == input[start:end]`), so a client can highlight
it without re-tokenizing.

Both read a run's `model/` in PyTorch on the CPU (sentences and contexts are cut into windows exactly as training
cut them: `data.tagging.encode_windows`, `data.answers.encode_questions`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from afinar.core.config import ModelArgs, QAArgs
from afinar.core.errors import AfinarError
from afinar.core.models import load_tokenizer
from afinar.data.answers import best_spans, encode_questions
from afinar.data.tagging import encode_windows, entities
from afinar.inference.predictors import softmax

WORD = re.compile(r"\S+")


@dataclass
class Span:
    text: str
    type: str  # the entity type, or "answer"
    start: int  # character offsets into the input: text == input[start:end]
    end: int
    score: float  # the model's probability: an entity's mean over its words, an answer's start x end

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpanPrediction:
    text: str  # the input (a question, for question answering)
    spans: list[Span]

    def to_dict(self) -> dict:
        return {"text": self.text, "spans": [span.to_dict() for span in self.spans]}

    def line(self) -> str:
        """`afinar predict`'s line: each span as `text [type start:end score]`, then the input."""
        found = "  ".join(f"{s.text} [{s.type} {s.start}:{s.end} {s.score:.3f}]" for s in self.spans) or "(none)"
        return f"{found}\t{self.text}"


class SpanPredictor:
    """What the two span models share: the micro-batching server's `scores` (a list of `SpanPrediction`s)."""

    backend = "torch"
    spans = True  # served by `serving.predict.create_span_app`
    reads_pairs = False

    def predict(self, inputs: list, batch_size: int | None = None) -> list[SpanPrediction]:
        raise NotImplementedError

    def scores(self, inputs: list, batch_size: int | None = None) -> list[SpanPrediction]:
        return self.predict(inputs, batch_size)


def _model_args(model_dir: Path) -> ModelArgs:
    if not (model_dir / "config.json").is_file():
        raise AfinarError(f"{model_dir} holds no saved model (config.json missing)")
    return ModelArgs(name=str(model_dir))


def words_with_offsets(tokenizer, text: str) -> list[tuple[str, tuple[int, int]]]:
    """The words a fast tokenizer's pre-tokenizer sees, with their character offsets (whitespace-separated words for
    a tokenizer without one). For BERT-style tokenizers punctuation stands apart, as in most tagged training
    data; where the data's words differ (CoNLL keeps `U.S.` whole, BERT splits it), an entity's span still comes
    back as offsets into the text, only its word boundaries are the tokenizer's."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None) if backend is not None else None
    if pre is None:
        return [(m.group(), m.span()) for m in WORD.finditer(text)]
    words = []
    for word, (start, end) in pre.pre_tokenize_str(text):
        stripped = text[start:end]
        lead = len(stripped) - len(stripped.lstrip())  # byte-level pre-tokenizers keep the leading space
        if stripped.strip():
            words.append((stripped.strip(), (start + lead, start + lead + len(stripped.strip()))))
    return words


class EntityTagger(SpanPredictor):
    """A token-classification model: `predict(texts)` -> the entities of each text. `backend` torch reads the
    run's `model/`; onnx and onnx-int8 its export (`afinar export`, in `onnx_dir`)."""

    def __init__(self, model_dir: str | Path, max_length: int = 128, stride: int = 32, batch_size: int = 32,
                 backend: str = "torch", onnx_dir: str | Path | None = None):
        self.backend = backend
        self.max_length, self.stride, self.batch_size = max_length, stride, batch_size
        if backend in ("onnx", "onnx-int8"):
            from afinar.inference.predictors import OnnxModel

            self.onnx = OnnxModel(onnx_dir, int8=backend == "onnx-int8")
            self.tokenizer, self.labels = self.onnx.tokenizer, self.onnx.labels
            self.tokenizer.padding_side = "right"  # word positions are read unpadded
            return
        if backend != "torch":
            raise AfinarError(f"backend {backend}: a token classifier predicts with torch, onnx or onnx-int8")
        from transformers import AutoModelForTokenClassification

        model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(_model_args(model_dir))
        self.tokenizer.padding_side = "right"  # word positions are read unpadded
        self.model = AutoModelForTokenClassification.from_pretrained(model_dir, use_safetensors=True).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def _logits(self, batch: dict) -> np.ndarray:
        """Per-token logits of one padded batch (numpy arrays)."""
        if self.backend != "torch":
            return self.onnx.logits(batch)
        return self.model(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}).logits.float().numpy()

    @torch.inference_mode()
    def word_probabilities(self, sentences: list[list[str]]) -> list[np.ndarray]:
        """Tag probabilities per word of each pre-split sentence (words x tags)."""
        windows = encode_windows(self.tokenizer, sentences, self.max_length, self.stride)
        out = [np.zeros((len(s), len(self.labels)), dtype=np.float32) for s in sentences]
        for s in out:
            s[:, 0] = 1.0  # a word the tokenizer drops is `O`
        for start in range(0, len(windows), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(windows)))
            batch = self.tokenizer.pad({k: [v[i] for i in rows] for k, v in windows.encodings.items() if k != "labels"},
                                       return_tensors="np")
            probabilities = softmax(self._logits(dict(batch)))
            for row, i in enumerate(rows):
                positions = [p for p, label in enumerate(windows.encodings["labels"][i]) if label != -100]
                for (s, word), position in zip(windows.words[i], positions):
                    out[s][word] = probabilities[row, position]
        return out

    def tag(self, sentences: list[list[str]]) -> list[list[str]]:
        """The most probable tag of each word of each pre-split sentence."""
        return [[self.labels[int(i)] for i in p.argmax(axis=1)] for p in self.word_probabilities(sentences)]

    def predict(self, texts: list[str], batch_size: int | None = None) -> list[SpanPrediction]:
        if batch_size:
            self.batch_size = batch_size
        split = [words_with_offsets(self.tokenizer, text) for text in texts]
        probabilities = self.word_probabilities([[w for w, _ in words] for words in split])
        out = []
        for text, words, p in zip(texts, split, probabilities):
            tags = [self.labels[int(i)] for i in p.argmax(axis=1)]
            best = p.max(axis=1) if len(p) else p
            spans = []
            for start, end, kind in entities([tags])[0]:
                begin, finish = words[start][1][0], words[end - 1][1][1]
                spans.append(Span(text[begin:finish], kind, begin, finish, float(np.mean(best[start:end]))))
            out.append(SpanPrediction(text, spans))
        return out


class AnswerExtractor(SpanPredictor):
    """An extractive question-answering model: `predict([(question, context), ...])` -> the answer span of each,
    its offsets into the context."""

    reads_pairs = True

    def __init__(self, model_dir: str | Path, args: QAArgs | None = None, batch_size: int = 32):
        from transformers import AutoModelForQuestionAnswering

        model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(_model_args(model_dir))
        self.tokenizer.padding_side = "right"  # token offsets are read unpadded
        self.model = AutoModelForQuestionAnswering.from_pretrained(model_dir, use_safetensors=True).eval()
        self.args = args or QAArgs()
        self.batch_size = batch_size
        self.labels = ["answer"]

    @torch.inference_mode()
    def answers(self, questions: list[str], contexts: list[str]) -> list[tuple[int, int, float]]:
        """(character start, end, probability) of the best answer span of each question in its context."""
        features = encode_questions(self.tokenizer, questions, contexts, self.args)
        starts, ends = [], []
        for first in range(0, len(features), self.batch_size):
            rows = range(first, min(first + self.batch_size, len(features)))
            batch = self.tokenizer.pad({k: [v[i] for i in rows] for k, v in features.encodings.items()},
                                       return_tensors="pt")
            output = self.model(**batch)
            width = self.args.max_seq_length
            for logits, out in ((output.start_logits, starts), (output.end_logits, ends)):
                padded = np.full((len(rows), width), -np.inf, dtype=np.float32)
                padded[:, :logits.shape[1]] = logits.float().numpy()
                out.append(padded)
        if not features.question:
            return []
        return best_spans(features, np.concatenate(starts), np.concatenate(ends), contexts, self.args)

    def predict(self, pairs: list[tuple[str, str]], batch_size: int | None = None) -> list[SpanPrediction]:
        for item in pairs:
            if not isinstance(item, tuple) or len(item) != 2:
                raise AfinarError("question answering takes (question, context) pairs; give a question and its "
                                  "context (afinar predict RUN QUESTION --context CONTEXT)")
        if batch_size:
            self.batch_size = batch_size
        found = self.answers([q for q, _ in pairs], [c for _, c in pairs])
        return [SpanPrediction(question, [Span(context[start:end], "answer", start, end, probability)]
                               if end > start else [])
                for (question, context), (start, end, probability) in zip(pairs, found)]


__all__ = ["AnswerExtractor", "EntityTagger", "SpanPredictor", "Span", "SpanPrediction", "words_with_offsets"]
