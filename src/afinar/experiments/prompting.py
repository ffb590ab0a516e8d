"""Classify by prompting a causal LM: no training, each label's answer word is scored after a prompt.

    prompt   = instructions [+ k labelled examples] + the text + the answer cue
    score[c] = log P(verbalizer[c] | prompt), summed over the verbalizer's tokens

Two things make this usable, and affordable on a CPU:

- Calibration ("calibrate before use", Zhao et al. 2021). A small model's label scores are badly biased: one
  answer wins whatever the text (SmolLM2-135M zero-shot never says neutral). Each class's mean score over
  *training* texts (their labels unused) or over content-free inputs ("N/A") is subtracted. Held-out texts are
  never used to estimate it. Both raw and calibrated results are reported.
- A shared prefix computed once. The instructions (and for few-shot the examples) open every prompt: their
  keys/values are computed once (`past_key_values`) and each batch starts from its own expanded copy, so only
  each text's tokens and the answer go through the model. Rows are right-padded, so positions stay correct.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from afinar.core.config import ModelArgs, PromptArgs
from afinar.core.errors import AfinarError
from afinar.core.models import cache_argument, load_causal_lm, load_tokenizer, resolve, returned_cache

CONTENT_FREE = ("N/A", "", "[MASK]")
SENTINEL = "\u2063"  # an invisible character that marks where the first variable text enters the prompt

Shot = tuple[str, int]  # (text, label id)


def class_bias(scores: np.ndarray) -> np.ndarray:
    """Each class's mean score: what a class gets whatever the text."""
    return np.asarray(scores, dtype=np.float64).mean(axis=0)


def calibrate(scores: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.asarray(scores) - bias


def balanced_shots(texts: Sequence[str], labels: Sequence[int], k: int, num_classes: int, seed: int) -> list[Shot]:
    """k examples, as evenly spread over the classes as the data allows, seeded, in shuffled order."""
    rng = random.Random(seed)
    by_class = [[i for i, label in enumerate(labels) if label == c] for c in range(num_classes)]
    for rows in by_class:
        rng.shuffle(rows)
    picked: list[int] = []
    while len(picked) < k and any(by_class):
        for rows in rng.sample(by_class, len(by_class)):  # which classes get the remainder is seeded too
            if rows and len(picked) < k:
                picked.append(rows.pop())
    rng.shuffle(picked)
    return [(texts[i], int(labels[i])) for i in picked]


def _enumerate(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


class PromptClassifier:
    """Label scores from a causal LM. `set_prompt` fixes the examples (few-shot) or says that each text brings
    its own (retrieval); `scores` returns raw log-probabilities; `bias` (set by calibrating) is subtracted by
    `predict`."""

    def __init__(self, args: PromptArgs, label_names: list[str], model_args: ModelArgs | None = None):
        self.args = args.validate()  # fields may have been set after construction (config overrides)
        self.labels = list(label_names)
        model_args = model_args or ModelArgs(name=args.model)
        path = resolve(model_args)
        self.tokenizer = load_tokenizer(model_args, path)
        self.model = load_causal_lm(model_args, path).to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.device = next(self.model.parameters()).device
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        words = args.verbalizers or self.labels
        if len(words) != len(self.labels):
            raise AfinarError(f"prompt.verbalizers has {len(words)} words for {len(self.labels)} labels")
        self.words = [" ".join(str(word).split()) for word in words]
        # A chat answer starts its own line ("assistant\n"); a plain prompt's follows "Answer:" after a space.
        self.verbalizer_ids = [self._ids(word if self.chat else " " + word) for word in self.words]
        if any(not ids for ids in self.verbalizer_ids) or len(set(map(tuple, self.verbalizer_ids))) < len(words):
            raise AfinarError(f"the verbalizers {self.words} must be non-empty and tokenize differently")
        self.single_token = all(len(ids) == 1 for ids in self.verbalizer_ids)
        self.cache_kwarg = cache_argument(self.model)
        self.per_row_logits = True
        self.bias = np.zeros(len(self.labels))
        self.set_prompt()

    # ------------------------------------------------------------ the prompt

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def clean(self, texts: Sequence[str]) -> list[str]:
        """One line each (the format's line breaks stay unambiguous), cut to `max_text_tokens` tokens."""
        texts = [" ".join(str(text).split()) for text in texts]
        limit = self.args.max_text_tokens
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [self.tokenizer.decode(row[:limit]).strip() if len(row) > limit else text
                for text, row in zip(texts, ids)]

    def render(self, shots: Sequence[Shot], text: str) -> str:
        """The whole prompt up to where the answer goes: the instruction, `Text: ... / Answer: ...` blocks for the
        examples, then the text. With a chat template all of it is one user message and the answer is the
        assistant's reply: SmolLM2-135M used retrieved examples better this way than as one conversation turn per
        example (200 validation tweets, 2 neighbours: 0.535 against 0.425 calibrated accuracy)."""
        instruction = self.args.instruction.replace("{labels}", _enumerate(self.words))
        blocks = [instruction] + [f"Text: {shot}\nAnswer: {self.words[label]}" for shot, label in shots]
        if self.chat:
            content = "\n\n".join(blocks + [f"Text: {text}"])
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        return "\n\n".join(blocks + [f"Text: {text}\nAnswer:"])

    def set_prompt(self, shots: Sequence[Shot] = (), per_text_shots: bool = False) -> None:
        """Fix the prompt: no examples (zero-shot), these examples (few-shot), or examples given per text with
        `scores(..., shots=...)` (retrieval). Computes the shared prefix's keys/values once."""
        self.shots = [(text, int(label)) for text, label in zip(self.clean([s for s, _ in shots]),
                                                                 [label for _, label in shots])]
        self.per_text_shots = per_text_shots
        probe = self.render([(SENTINEL, 0)], "x") if per_text_shots else self.render(self.shots, SENTINEL)
        self.prefix = probe[:probe.index(SENTINEL)].rstrip(" ")  # a word's leading space belongs to the word
        self.prefix_ids = self._ids(self.prefix)
        bos = self.tokenizer.bos_token_id
        if not self.chat and bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos]:
            self.prefix_ids = [bos] + self.prefix_ids
        self._prefix_kv = None
        if self.prefix_ids:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([self.prefix_ids], device=self.device), use_cache=True,
                                 logits_to_keep=1)
            layers = getattr(returned_cache(out), "layers", None)
            if layers and not any(getattr(layer, "is_sliding", False) for layer in layers):
                self._prefix_kv = [(layer.keys, layer.values) for layer in layers]
            # otherwise (sliding-window or legacy caches) every row carries the prefix: slower, same scores

    def _batch_cache(self, rows: int):
        """A fresh cache holding the prefix for `rows` rows: `expand` is a view, and the cache's first `update`
        concatenates it into new tensors, so the stored prefix is never written to."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer, (keys, values) in enumerate(self._prefix_kv):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
        return cache

    # ------------------------------------------------------------ scoring

    def scores(self, texts: Sequence[str], shots: Sequence[Sequence[Shot]] | None = None,
               use_cache: bool = True) -> np.ndarray:
        """Raw scores, one row per text: log P(verbalizer | prompt) per class. `shots` gives each text its own
        examples (after `set_prompt(per_text_shots=True)`); `use_cache=False` runs the prefix with every row,
        which gives the same numbers more slowly (the tests compare the two)."""
        if self.per_text_shots != (shots is not None):
            raise AfinarError("pass shots per text exactly when the prompt was set with per_text_shots=True")
        texts = self.clean(texts)
        cached = use_cache and self._prefix_kv is not None
        rows: list[tuple[list[int], list[tuple[int, int, int, int]]]] = []  # ids, reads (position, token, i, c)
        for i, text in enumerate(texts):
            own = self.clean([s for s, _ in shots[i]]) if shots is not None else []
            full = self.render([(s, int(label)) for s, (_, label) in zip(own, shots[i])] if shots is not None
                               else self.shots, text)
            if not full.startswith(self.prefix):
                raise AfinarError("the chat template changed the prompt's opening; cannot share a prefix")
            context = ([] if cached else self.prefix_ids) + self._ids(full[len(self.prefix):])
            if self.single_token:  # one row answers every class: the next-token distribution after the prompt
                rows.append((context, [(len(context) - 1, ids[0], i, c) for c, ids in enumerate(self.verbalizer_ids)]))
                continue
            for c, ids in enumerate(self.verbalizer_ids):
                rows.append((context + ids[:-1], [(len(context) - 1 + j, token, i, c) for j, token in enumerate(ids)]))
        longest = len(self.prefix_ids) * cached + max((len(ids) for ids, _ in rows), default=0)
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions",
                                                                                        None)
        if limit and longest > limit:
            raise AfinarError(f"a prompt of {longest} tokens is longer than {self.args.model} accepts ({limit}); "
                              f"use fewer shots or a lower prompt.max_text_tokens")
        out = np.zeros((len(texts), len(self.labels)))
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
        for start in range(0, len(order), self.args.prompt_batch_size):
            self._score_batch([rows[r] for r in order[start:start + self.args.prompt_batch_size]], cached, out)
        return out

    @torch.inference_mode()
    def _score_batch(self, batch: list, cached: bool, out: np.ndarray) -> None:
        width = max(len(ids) for ids, _ in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=self.device)
        # each row's positions to read, padded to a common count by repeating its last one
        reads = max(len(r) for _, r in batch)
        positions = torch.tensor([[p for p, *_ in r] + [r[-1][0]] * (reads - len(r)) for _, r in batch],
                                 device=self.device)
        if cached:
            mask = torch.cat([mask.new_ones(len(batch), len(self.prefix_ids)), mask], dim=1)

        def forward(keep):  # each call starts from a fresh copy of the prefix
            past = self._batch_cache(len(batch)) if cached else None
            return self.model(input_ids=input_ids, attention_mask=mask, use_cache=cached, logits_to_keep=keep,
                              **{self.cache_kwarg: past}).logits

        logits = None
        if self.per_row_logits:  # only the vocabulary rows that are read (per-row positions: transformers >= 5.x)
            try:
                logits = forward(positions)
            except (IndexError, RuntimeError, TypeError):
                pass
        if logits is None or logits.dim() != 3 or logits.shape[1] != reads:
            self.per_row_logits = False  # an older transformers: every position's logits, then pick
            logits = torch.take_along_dim(forward(0), positions[..., None], dim=1)
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        for row, (_, row_reads) in enumerate(batch):
            for j, (_, token, i, c) in enumerate(row_reads):
                out[i, c] += logprobs[row, j, token]

    def calibrate_on(self, texts: Sequence[str], shots: Sequence[Sequence[Shot]] | None = None) -> np.ndarray:
        """Set `bias` to each class's mean score over `texts` (training or content-free texts, never held-out)."""
        self.bias = class_bias(self.scores(texts, shots))
        return self.bias

    def predict(self, texts: Sequence[str], shots: Sequence[Sequence[Shot]] | None = None) -> dict[str, np.ndarray]:
        """Label ids, calibrated (the headline) and raw."""
        raw = self.scores(texts, shots)
        return {"calibrated": calibrate(raw, self.bias).argmax(axis=1), "raw": raw.argmax(axis=1)}
