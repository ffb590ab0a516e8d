"""Shared fixtures: tiny models built from configs (no network), small real data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The project's real data lives beside the repository (../shared/data), read in place, never written.
SHARED = Path(os.environ.get("AFINAR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TWEETS = SHARED / "tweet_sentiment_extraction"


@pytest.fixture(scope="session", autouse=True)
def afinar_cache(tmp_path_factory):
    """Converted assets go to a per-session cache, never the user's."""
    path = tmp_path_factory.mktemp("afinar-cache")
    os.environ["AFINAR_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two spinning OpenMP
    threads per process make every step several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with the real MiniLM WordPiece tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from afinar.assets import model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm-l6"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with OpenAI's real BPE files (from the gpt2-tokenizer asset); no pad token, as GPT-2."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from afinar.assets import model_path

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(model_path("gpt2-tokenizer"))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tweet_rows(split: str, n: int) -> list[dict]:
    """The first `n` rows of the real hub-format tweet JSONL."""
    with open(TWEETS / f"mteb_format_{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


@pytest.fixture
def tweets_jsonl(tmp_path) -> tuple[Path, Path]:
    """Small train/test JSONL files cut from the real tweet data."""
    paths = []
    for split, n in (("train", 240), ("test", 60)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in tweet_rows(split, n)), encoding="utf-8")
        paths.append(path)
    return tuple(paths)
