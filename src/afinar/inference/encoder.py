"""Sentence embeddings from any encoder: the features the bake-off's retrieval and linear probe use, and the
out-of-fold suspect-label ranking."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from afinar.core.config import ModelArgs
from afinar.core.models import load_tokenizer, resolve
from afinar.data import sources as data_lib


class Encoder:
    """Sentence embeddings: the mean of the last hidden states over real tokens, L2-normalised."""

    def __init__(self, name: str, max_length: int = 128, batch_size: int = 64):
        from transformers import AutoModel

        args = ModelArgs(name=name)
        path = resolve(args)
        self.name, self.max_length, self.batch_size = name, max_length, batch_size
        self.tokenizer = load_tokenizer(args, path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).to(self.device).eval()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for index, batch in data_lib.padded_batches(self.tokenizer, texts, self.batch_size, self.max_length, "pt"):
            batch = batch.to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            out[index] = torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy()
        return out

    def features(self, inputs: Sequence[data_lib.Input]) -> np.ndarray:
        """A classifier's input per row: the embedding of a text; for sentence pairs the embeddings u, v of the two
        texts as (u, v, |u - v|, u * v), the features InferSent and Sentence-BERT classify pairs from."""
        if not inputs or not isinstance(inputs[0], tuple):
            return self.encode(inputs)
        u, v = self.encode([a for a, _ in inputs]), self.encode([b for _, b in inputs])
        return np.hstack([u, v, np.abs(u - v), u * v])
