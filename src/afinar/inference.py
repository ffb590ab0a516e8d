"""Predictions from a saved model: texts sorted by length, tokenized in batches, padded per batch.

Sorting by length before batching means a batch of short tweets is not padded to the longest text in the
request; results are put back into input order before they are returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from afinar.config import ModelArgs
from afinar.data import encode
from afinar.errors import AfinarError
from afinar.models import load_classifier, load_tokenizer


@dataclass
class Prediction:
    text: str
    label: str
    scores: dict[str, float]


class Classifier:
    """A fine-tuned sequence classifier loaded from a model folder (a run's `model/`)."""

    def __init__(self, model_dir: str | Path, max_length: int = 128, allow_pickle: bool = False):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise AfinarError(f"{model_dir} holds no saved model (config.json missing)")
        args = ModelArgs(name=str(model_dir), allow_pickle=allow_pickle)
        self.tokenizer = load_tokenizer(args)
        config_labels = self._labels(model_dir)
        self.model = load_classifier(args, config_labels, self.tokenizer).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_length = max_length

    @staticmethod
    def _labels(model_dir: Path) -> list[str]:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        return [config.id2label[i] for i in range(config.num_labels)]

    @torch.inference_mode()
    def scores(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per text, in input order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            encoded = encode(self.tokenizer, [texts[i] for i in index], self.max_length)
            batch = self.tokenizer.pad(encoded, return_tensors="pt")
            logits = self.model(**batch).logits.float()
            out[index] = torch.softmax(logits, dim=-1).numpy()
        return out

    def predict(self, texts: list[str], batch_size: int = 64) -> list[Prediction]:
        probabilities = self.scores(texts, batch_size)
        return [Prediction(text, self.labels[int(row.argmax())],
                           {label: float(p) for label, p in zip(self.labels, row)})
                for text, row in zip(texts, probabilities)]
