"""Content-keyed on-disk cache for the data work a rerun would repeat: reading and normalising the files, the
checks' report and the tokenized splits.

Keys hash what the result depends on and nothing else: the files' bytes (not their names or times) or the texts
and labels themselves, the tokenizer's full definition, and the settings. So a second run on the same data starts
training in seconds, and any change that matters (an edited row, another tokenizer, another `max_length`)
misses. Entries live under `$AFINAR_CACHE/data` (default `~/.cache/afinar/data`), are fsynced and renamed into
place (a power cut leaves an entry whole or absent), are checked on reuse (an unreadable or short entry is computed
again), and are evicted least-recently-used first once the folder passes `$AFINAR_CACHE_MAX_GB` (default 20);
temporary files that a killed process left behind are removed after an hour.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, load_from_disk
from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

from afinar.core.assets import cache_dir
from afinar.core.runs import write_atomic

log = logging.getLogger(__name__)

VERSION = 2  # bump when what is cached, or how it is computed, changes
STALE_SECONDS = 3600  # a temporary entry this old belongs to a process that is gone


def data_cache_dir() -> Path:
    return cache_dir() / "data"


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps([VERSION, *parts], sort_keys=True, default=str, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def dataset_digest(ds: Dataset) -> str:
    """Hash of a split's texts and labels, in order, read from the Arrow buffers (about 100x faster than
    iterating the rows in Python): the UTF-8 bytes, the offsets where each text ends, and the labels."""
    table = ds.data.table
    if ds._indices is not None:  # a selection or shuffle: gather the rows it stands for
        table = table.take(ds._indices.column(0))
    sha = hashlib.sha256()
    for column in ("text", "text_pair"):  # a sentence pair's second text is part of the row
        if column not in table.column_names:
            continue
        texts = table.column(column).cast(pa.large_string()).combine_chunks()
        _, offsets, data = texts.buffers()
        ends = np.frombuffer(offsets, dtype=np.int64)[texts.offset:texts.offset + len(texts) + 1]
        sha.update(column.encode())
        sha.update((ends - ends[0]).tobytes())
        sha.update(memoryview(data)[ends[0]:ends[-1]] if data is not None else b"")
    sha.update(table.column("label").to_numpy().astype(np.int64).tobytes())
    return sha.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Hash of everything that decides a tokenizer's output: its full definition when it is a fast tokenizer,
    else its vocabulary, plus the special tokens and the padding/truncation sides."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (_definition_hash(backend.to_str()) if backend is not None else
                  hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode("utf-8")).hexdigest())
    return digest(type(tokenizer).__name__, definition, tokenizer.all_special_tokens, tokenizer.pad_token,
                  tokenizer.padding_side, tokenizer.truncation_side)


@functools.lru_cache(maxsize=4)
def _definition_hash(definition: str) -> str:
    """Hash of a fast tokenizer's JSON without its truncation and padding state (whatever the last call left:
    not identity). Parsing megabytes of JSON takes a quarter second, and one run asks for every split."""
    parsed = json.loads(definition)
    parsed.pop("truncation", None)
    parsed.pop("padding", None)
    return hashlib.sha256(json.dumps(parsed, sort_keys=True).encode("utf-8")).hexdigest()


def cached_json(kind: str, key: str, compute: Callable[[], dict], enabled: bool = True) -> tuple[dict, bool]:
    """`compute()` or its cached result; the bool says whether the cache answered."""
    path = data_cache_dir() / kind / f"{key}.json"
    if enabled and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")), True
        except (OSError, ValueError):  # a damaged entry is recomputed and replaced
            log.warning("cache entry %s is unreadable; recomputing it", path)
    value = compute()
    if enabled:
        write_atomic(path, json.dumps(value, ensure_ascii=False))
    return value, False


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prune(max_bytes: int | None = None) -> list[Path]:
    """Remove what a killed process left (temporary entries older than an hour), then the least recently used
    entries until the data cache is under `max_bytes` (default `$AFINAR_CACHE_MAX_GB`, 20 GB); returns what went."""
    if max_bytes is None:
        max_bytes = int(float(os.environ.get("AFINAR_CACHE_MAX_GB", "20")) * 2**30)
    root = data_cache_dir()
    entries = [p for kind in root.iterdir() if kind.is_dir() for p in kind.iterdir()] if root.is_dir() else []
    removed, now = [], time.time()
    for entry in entries:
        if entry.name.startswith(".") and now - entry.stat().st_mtime > STALE_SECONDS:
            _remove(entry)
            removed.append(entry)
    kept = sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    sizes = {p: _size(p) for p in kept}
    total = sum(sizes.values())
    for entry in kept:
        if total <= max_bytes:
            break
        _remove(entry)
        total -= sizes[entry]
        removed.append(entry)
    if removed:
        log.info("cache: removed %d entries (stale temporaries or least recently used)", len(removed))
    return removed


def cached_map(ds: Dataset, key: str, function: Callable[[dict], dict], remove_columns: Iterable[str],
               desc: str, enabled: bool = True) -> tuple[Dataset, bool]:
    """`ds.map(function, batched=True)`, stored as an Arrow file named by `key` and memory-mapped on reuse. An entry
    that does not read back with one row per input row (cut short, emptied) is computed again."""
    if not enabled:
        return ds.map(function, batched=True, remove_columns=list(remove_columns), desc=desc), False
    path = data_cache_dir() / "tokenized" / f"{key}.arrow"
    if path.is_file():
        try:
            cached = Dataset.from_file(str(path))
            if len(cached) == len(ds):
                os.utime(path)  # recently used: evicted last
                return cached, True
        except Exception:  # pyarrow raises several types for a damaged file
            pass
        log.warning("cache entry %s is damaged; computing it again", path)
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")  # several processes may race: last wins
    try:
        ds.map(function, batched=True, remove_columns=list(remove_columns), desc=desc,
               cache_file_name=str(temporary), load_from_cache_file=False)
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    prune()
    return Dataset.from_file(str(path)), False


def cached_datasets(key: str, compute: Callable[[], tuple[dict[str, Dataset], dict]]
                    ) -> tuple[dict[str, Dataset], dict, bool]:
    """`compute()` -> (named datasets, JSON-able metadata), or both from the cache, read into memory (as
    computed ones are, so later selections write no files into the cache); the bool says whether the cache
    answered."""
    folder = data_cache_dir() / "datasets" / key
    if (folder / "meta.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            datasets = {name: load_from_disk(str(folder / name), keep_in_memory=True) for name in meta["datasets"]}
            os.utime(folder)  # recently used: evicted last
            return datasets, meta["meta"], True
        except Exception:  # OSError, JSON, a missing key, or pyarrow's errors for a damaged file
            log.warning("cache entry %s is unreadable; recomputing it", folder)
            shutil.rmtree(folder, ignore_errors=True)
    datasets, meta = compute()
    temporary = folder.with_name(f".{key}.{uuid.uuid4().hex}")
    bars = is_progress_bar_enabled()
    disable_progress_bar()  # a bar per split for a write of milliseconds is noise on the terminal
    try:
        for name, ds in datasets.items():
            ds.save_to_disk(str(temporary / name))
            for file in (temporary / name).iterdir():
                _fsync(file)
        write_atomic(temporary / "meta.json", json.dumps({"datasets": list(datasets), "meta": meta}))
        os.replace(temporary, folder)  # the folder appears complete or not at all
        _fsync(folder.parent)
    except OSError:  # another process stored the same entry first, or the disk is full: not an error here
        pass
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        if bars:
            enable_progress_bar()
    prune()
    return datasets, meta, False
