"""The data cache: a rerun on the same rows skips the checks and tokenization, and any change that matters misses."""

import dataclasses
import logging

import pandas as pd
import pytest
from conftest import tweet_rows
from transformers import AutoTokenizer

from afinar.core.config import CheckArgs, DataArgs
from afinar.data import cache
from afinar.data.checks import run_checks, run_checks_cached
from afinar.data.sources import Splits, _to_dataset, read_splits, tokenize


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AFINAR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def splits(tweets_jsonl):
    train, test = tweets_jsonl
    return read_splits(DataArgs(source=str(train), test=str(test)))


def test_dataset_digest_follows_content_not_identity(splits):
    train = splits.train
    assert cache.dataset_digest(train) == cache.dataset_digest(train.select(range(len(train))))
    relabelled = train.map(lambda row, i: {"label": (row["label"] + 1) % 3 if i == 7 else row["label"]},
                           with_indices=True)
    assert cache.dataset_digest(relabelled) != cache.dataset_digest(train)
    assert cache.dataset_digest(train.select(range(1, len(train)))) != cache.dataset_digest(train)
    # a shuffled selection hashes like the same rows built afresh (the digest gathers through the indices)
    shuffled = train.shuffle(seed=3).select(range(5, 25))
    rebuilt = _to_dataset(pd.DataFrame(shuffled[:]), splits.label_names)
    assert cache.dataset_digest(shuffled) == cache.dataset_digest(rebuilt) != cache.dataset_digest(train)
    moved = _to_dataset(pd.DataFrame({"text": ["ab", "c"], "label": [0, 1]}), splits.label_names)
    assert cache.dataset_digest(moved) != cache.dataset_digest(
        _to_dataset(pd.DataFrame({"text": ["a", "bc"], "label": [0, 1]}), splits.label_names))


def test_files_with_the_same_bytes_are_read_once(tweets_jsonl, own_cache, tmp_path, caplog):
    train, test = tweets_jsonl
    with caplog.at_level(logging.INFO, logger="afinar"):
        first = read_splits(DataArgs(source=str(train), test=str(test)))
        assert "data read from the cache" not in caplog.text
        copy = tmp_path / "elsewhere.jsonl"
        copy.write_bytes(train.read_bytes())  # another name, the same bytes
        second = read_splits(DataArgs(source=str(copy), test=str(test)))
        assert "data read from the cache" in caplog.text
    assert second.train[:] == first.train[:] and second.test[:] == first.test[:]
    assert second.label_names == first.label_names and second.sources["train"] == str(copy)
    assert second.fingerprints == first.fingerprints
    caplog.clear()
    lines = train.read_text(encoding="utf-8").splitlines()
    copy.write_text("\n".join([lines[0].replace('"text": "', '"text": "edited ', 1), *lines[1:]]) + "\n",
                    encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="afinar"):
        edited = read_splits(DataArgs(source=str(copy), test=str(test)))
        assert "data read from the cache" not in caplog.text
        other_column = read_splits(DataArgs(source=str(train), test=str(test), label_column="label_text"))
        assert "data read from the cache" not in caplog.text  # reading settings are part of the key
    assert edited.train[0]["text"].startswith("edited ") and edited.train[1:] == first.train[1:]
    assert other_column.train["label"] == first.train["label"]


def test_tokenizer_digest_tells_tokenizers_apart(tiny_bert, tiny_gpt2):
    bert, gpt2 = AutoTokenizer.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_gpt2)
    assert cache.tokenizer_digest(bert) == cache.tokenizer_digest(AutoTokenizer.from_pretrained(tiny_bert))
    assert cache.tokenizer_digest(bert) != cache.tokenizer_digest(gpt2)
    gpt2.pad_token = gpt2.eos_token  # what afinar does to GPT-2: empty rows become this token
    assert cache.tokenizer_digest(gpt2) != cache.tokenizer_digest(AutoTokenizer.from_pretrained(tiny_gpt2))


def test_second_tokenization_comes_from_the_cache(splits, tiny_bert, own_cache, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    with caplog.at_level(logging.INFO, logger="afinar"):
        first = tokenize(splits.train, tokenizer, 16)
        assert "from the cache" not in caplog.text
        second = tokenize(splits.train, tokenizer, 16)
        assert "from the cache" in caplog.text
    assert second[:] == first[:]
    assert max(second["length"]) == 16
    assert len(list((own_cache / "data" / "tokenized").glob("*.arrow"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="afinar"):
        longer = tokenize(splits.train, tokenizer, 32)  # another max_length is another entry
    assert "from the cache" not in caplog.text and max(longer["length"]) > 16
    assert tokenize(splits.train, tokenizer, 16, use_cache=False)[:] == first[:]


def test_checks_report_round_trips_through_the_cache(tiny_bert, own_cache, caplog):
    rows = tweet_rows("train", 120)
    texts = [r["text"] for r in rows] + [rows[0]["text"], rows[1]["text"].upper(), "   "]  # dups and an empty
    labels = [r["label"] for r in rows] + [rows[0]["label"], (rows[1]["label"] + 1) % 3, 0]
    test_rows = tweet_rows("test", 30)
    test = pd.DataFrame({"text": [r["text"] for r in test_rows] + [rows[5]["text"]],
                         "label": [r["label"] for r in test_rows] + [rows[5]["label"]]})
    names = ["negative", "neutral", "positive"]
    data = Splits(_to_dataset(pd.DataFrame({"text": texts, "label": labels}), names), None,
                  _to_dataset(test, names), names)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    fresh = run_checks(data, CheckArgs(), tokenizer, 32)
    assert fresh.duplicates["train"].count and fresh.conflicts.count and fresh.leakage["train-test"]["exact"].count
    with caplog.at_level(logging.INFO, logger="afinar"):
        first = run_checks_cached(data, CheckArgs(), tokenizer, 32)
        second = run_checks_cached(data, CheckArgs(), tokenizer, 32)
    assert caplog.text.count("data checks: from the cache") == 1
    assert dataclasses.asdict(first) == dataclasses.asdict(second) == dataclasses.asdict(fresh)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="afinar"):
        run_checks_cached(data, CheckArgs(near_duplicate_threshold=0.7), tokenizer, 32)
    assert "from the cache" not in caplog.text


def test_a_damaged_entry_is_recomputed(own_cache):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assert cache.cached_json("demo", "k", compute) == ({"value": 1}, False)
    assert cache.cached_json("demo", "k", compute) == ({"value": 1}, True)
    (own_cache / "data" / "demo" / "k.json").write_text("{not json", encoding="utf-8")
    assert cache.cached_json("demo", "k", compute) == ({"value": 2}, False)


@pytest.mark.parametrize("damage", ["truncated", "emptied"])
def test_a_cut_short_tokenized_entry_is_computed_again_with_every_row(splits, tiny_bert, own_cache, caplog, damage):
    """After a power cut an entry may be empty or end early; reused, it would fail every run or lose rows."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    first = tokenize(splits.train, tokenizer, 16)[:]  # read into memory: the file is damaged below
    (entry,) = (own_cache / "data" / "tokenized").glob("*.arrow")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2] if damage == "truncated" else b"")
    with caplog.at_level(logging.WARNING, logger="afinar"):
        again = tokenize(splits.train, tokenizer, 16)
    assert "is damaged; computing it again" in caplog.text
    assert len(again) == len(splits.train) and again[:] == first


def test_the_cache_evicts_least_recently_used_and_clears_what_killed_processes_left(own_cache):
    import os
    import time

    folder = own_cache / "data" / "demo"
    folder.mkdir(parents=True)
    for age, name in ((300, "old.json"), (200, "used.json"), (100, "new.json")):
        (folder / name).write_bytes(b"x" * 1000)
        os.utime(folder / name, (time.time() - age, time.time() - age))
    os.utime(folder / "used.json")  # read a moment ago
    stale, fresh = folder / ".tmp-from-a-killed-run", folder / ".tmp-being-written"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    removed = cache.prune(max_bytes=2000)
    assert {p.name for p in removed} == {"old.json", ".tmp-from-a-killed-run"}
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-being-written", "new.json", "used.json"]


def test_an_asset_folder_without_its_weights_is_built_again(own_cache):
    from afinar.core import assets

    builds = []

    def build(out):
        builds.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    target = assets._build_once("demo", build)
    assert assets._build_once("demo", build) == target and len(builds) == 1
    (target / "model.safetensors").write_bytes(b"")  # the rename survived a power cut, the bytes did not
    assert assets._build_once("demo", build) == target and len(builds) == 2
    assert (target / "model.safetensors").read_bytes() == b"weights"
