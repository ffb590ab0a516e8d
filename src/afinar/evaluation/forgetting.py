"""Catastrophic forgetting: perplexity on domain and general text before and after tuning, and replay.

Forgetting is measured as the rise in perplexity on general English (the embedded WikiText-2 test) from the
base model to the tuned one. Replay, the usual mitigation, mixes general text into the training blocks. The two
must never share text, or the check would reward memorising the replayed passages, so the embedded corpus is
split once, at an article boundary near the middle:

    WikiText-2 test rows [0, split)      -> replay (when `lm.replay_fraction` > 0 and no `lm.replay_source`)
    WikiText-2 test rows [split, 4358)   -> the forgetting check (always, so runs with and without replay
                                            are measured on the same text and compare directly)
"""

from __future__ import annotations

import gzip
import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from afinar.core import assets
from afinar.core.config import LMArgs, ModelArgs
from afinar.core.errors import AfinarError
from afinar.core.models import max_positions

__all__ = ["Corpus", "general_corpus", "general_text", "measure_forgetting", "mix_replay",
           "perplexity", "perplexity_stats", "replay_corpus", "wikitext2_rows", "wikitext2_split"]

ARTICLE_HEADING = re.compile(r"^ = [^=].* = \n?$")  # level-1 headings (` = Title = `) start an article


# ---------------------------------------------------------------- general text and replay


@lru_cache(maxsize=1)
def wikitext2_rows() -> tuple[str, ...]:
    """The 4,358 rows of Hugging Face's `wikitext-2-raw-v1` test split, rebuilt from the embedded raw file
    (blank lines become '' as HF's loader makes them), so `"\\n\\n".join(rows)` is the usual perplexity input."""
    raw = gzip.decompress(assets.text_file("wikitext2").read_bytes()).decode("utf-8")
    return tuple(line if line.strip() else "" for line in raw.splitlines(keepends=True))


@lru_cache(maxsize=1)
def wikitext2_split() -> int:
    """First row of the held-out half: the article start nearest after the middle (no article is cut)."""
    rows = wikitext2_rows()
    heading = next(i for i in range(len(rows) // 2, len(rows)) if ARTICLE_HEADING.match(rows[i]))
    return heading - 1 if rows[heading - 1] == "" else heading


@dataclass
class Corpus:
    """Text plus an exact account of where it came from (recorded in the run's manifest and metrics)."""

    documents: list[str]
    source: str

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)


def _uses_wikitext(name: str | None) -> bool:
    return name is None or name == "wikitext2"


def general_corpus(lm: LMArgs) -> Corpus:
    """The general text the forgetting check measures: the held-out half of WikiText-2, or a given file."""
    if lm.general_text == "wikitext2":
        rows = wikitext2_rows()
        start = wikitext2_split()
        return Corpus(["\n\n".join(rows[start:])],
                      f"wikitext2 test rows {start}-{len(rows) - 1} (held out from replay; HF-style join)")
    from afinar.data.sources import read_text_file

    path = Path(lm.general_text).expanduser()
    if path.suffix.lower() not in (".txt", ".raw", ".gz"):
        raise AfinarError(f"lm.general_text must be {', '.join(assets.TEXTS)} or a .txt file (got {path})")
    return Corpus([read_text_file(path, "utf-8")], str(path))


def general_text(lm: LMArgs) -> str:
    """The general English the forgetting check scores (see `general_corpus` for its source)."""
    return general_corpus(lm).text


def replay_corpus(lm: LMArgs, encoding: str = "utf-8") -> Corpus:
    """The general text mixed into training: the first half of WikiText-2, or `lm.replay_source`."""
    if _uses_wikitext(lm.replay_source):
        rows = wikitext2_rows()
        end = wikitext2_split()
        return Corpus(["\n\n".join(rows[:end])], f"wikitext2 test rows 0-{end - 1} (HF-style join)")
    path = Path(lm.replay_source).expanduser()
    if not _uses_wikitext(lm.general_text) and path.resolve() == Path(lm.general_text).expanduser().resolve():
        raise AfinarError(f"lm.replay_source and lm.general_text are the same file ({path}): the forgetting "
                          f"check would measure text the model was trained on; use two different files")
    from afinar.data.sources import read_documents

    return Corpus(read_documents(path, encoding), str(path))


def mix_replay(domain: np.ndarray, replay: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, dict]:
    """Add replay blocks so that they make `fraction` of the training blocks, then shuffle (seeded).

    Replay blocks are drawn without replacement; only when the replay corpus is too small are they repeated,
    and the record says so."""
    if len(replay) == 0:
        raise AfinarError("the replay text is shorter than one lm.block_size block; give a longer lm.replay_source")
    wanted = round(fraction * len(domain) / (1 - fraction))
    rng = np.random.default_rng(seed)
    repeats, rest = divmod(wanted, len(replay))
    picked = np.concatenate([np.tile(np.arange(len(replay)), repeats),
                             rng.choice(len(replay), size=rest, replace=False)]).astype(np.int64)
    mixed = np.concatenate([domain, replay[picked]])
    mixed = mixed[rng.permutation(len(mixed))]
    info = {"fraction": fraction, "replay_blocks": wanted, "domain_blocks": int(len(domain)),
            "achieved_fraction": wanted / max(len(mixed), 1), "available_replay_blocks": int(len(replay)),
            "repeated": wanted > len(replay)}
    return mixed, info


# ---------------------------------------------------------------- perplexity


def _windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new tokens) for the strided sliding window of the HF perplexity guide: each window holds
    up to `block_size` tokens and scores only the tokens that no earlier window scored."""
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        windows.append((begin, end, end - previous_end))
        previous_end = end
        if end == n_tokens:
            break
    return windows


LOGITS_BUDGET_BYTES = 512 * 2**20  # the window batch's logits (three fp32 copies: output, .float(), log-softmax)


def perplexity_stats(model, tokenizer, text: str, block_size: int, stride: int, max_tokens: int | None = None,
                     batch_size: int = 4) -> dict:
    """Perplexity and the number of tokens it scored; see `perplexity`. The window batch is capped so that its
    logits stay within `LOGITS_BUDGET_BYTES`: 32 windows of 256 tokens over SmolLM2's 49,152-word vocabulary are
    1.6 GB of fp32 logits per copy, and the forgetting check after an sft run peaked at 9.9 GB of RAM."""
    import torch
    import torch.nn.functional as F

    if not 0 < stride <= block_size:
        raise AfinarError(f"lm.stride must be between 1 and lm.block_size={block_size} (got {stride}); a larger "
                          f"stride would skip tokens")
    limit = max_positions(model)
    if limit is not None and block_size > limit:
        raise AfinarError(f"lm.block_size={block_size} exceeds the model's {limit} positions; lower it")
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise AfinarError("perplexity needs a text of at least two tokens")
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    batch_size = max(1, min(batch_size, LOGITS_BUDGET_BYTES // (block_size * vocab * 4 * 3)))
    was_training = model.training
    model.eval()
    nll, scored = 0.0, 0
    try:
        with torch.inference_mode():
            windows = _windows(len(ids), block_size, stride)
            # full windows first, in batches; only the last window can be shorter
            for _, group in itertools.groupby(windows, key=lambda w: w[1] - w[0]):
                group = list(group)
                for i in range(0, len(group), batch_size):
                    batch = group[i:i + batch_size]
                    inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
                    targets = inputs[:, 1:].clone()
                    for row, (b, e, new) in enumerate(batch):
                        targets[row, : max(e - b - 1 - new, 0)] = -100  # context only: not scored again
                    logits = model(input_ids=inputs).logits[:, :-1].float()
                    nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=-100, reduction="sum").item()
                    scored += int((targets != -100).sum())
                    del logits
    finally:
        model.train(was_training)
    value = math.exp(nll / scored)
    return {"perplexity": value, "tokens": int(len(ids)), "scored_tokens": scored}


def perplexity(model, tokenizer, text: str, block_size: int, stride: int, max_tokens: int | None = None,
               batch_size: int = 4) -> float:
    """Strided sliding-window perplexity (Hugging Face's perplexity guide): windows of `block_size` tokens
    advance by `stride`, and each scores only its last `stride` tokens with the rest as context. Window batches
    are scored in `inference_mode` and reduced to a sum at once, so memory does not grow with the text.
    `max_tokens` keeps the first N tokens of the text (a reproducible cap for speed)."""
    return perplexity_stats(model, tokenizer, text, block_size, stride, max_tokens, batch_size)["perplexity"]


# ---------------------------------------------------------------- before vs after


def _measure(model_dir, model_args: ModelArgs, texts: dict[str, str], lm: LMArgs, batch_size: int) -> dict:
    from afinar.core.models import load_causal_lm, load_tokenizer, resolve

    path = resolve(model_args) if model_dir is None else str(model_dir)
    tokenizer = load_tokenizer(model_args, path)
    model = load_causal_lm(model_args, path, tokenizer)
    results = {name: perplexity_stats(model, tokenizer, text, lm.block_size, lm.stride, lm.max_eval_tokens,
                                      batch_size) for name, text in texts.items()}
    del model
    return results


def measure_forgetting(base_model_dir, tuned_model_dir, domain_text: str, general_text: str, lm: LMArgs,
                       model_args: ModelArgs | None = None, batch_size: int = 4) -> dict:
    """Perplexity of the base and the tuned model on domain and general text, and whether the general
    perplexity rose by more than `lm.forgetting_ratio` (forgetting). `base_model_dir` may be None to resolve
    `model_args.name` (an embedded name or hub id); `model_args` carries the base model's loading options
    (revision, remote code, pickle); the tuned model is always a plain safetensors folder. The models are
    loaded one after the other, so only one is in memory at a time."""
    base_args = model_args or ModelArgs(name=str(base_model_dir))
    texts = {"domain": domain_text, "general": general_text}
    base = _measure(base_model_dir, base_args, texts, lm, batch_size)
    tuned = _measure(tuned_model_dir, ModelArgs(name=str(tuned_model_dir)), texts, lm, batch_size)
    result = {}
    for name in texts:
        result[name] = {"base_perplexity": base[name]["perplexity"], "tuned_perplexity": tuned[name]["perplexity"],
                        "ratio": tuned[name]["perplexity"] / base[name]["perplexity"],
                        "tokens": tuned[name]["tokens"], "scored_tokens": tuned[name]["scored_tokens"]}
    result["forgetting"] = result["general"]["ratio"] > lm.forgetting_ratio
    result["forgetting_ratio"] = lm.forgetting_ratio
    result["window"] = {"block_size": lm.block_size, "stride": lm.stride, "max_tokens": lm.max_eval_tokens}
    return result
