"""Load labelled text from anywhere, normalise it to `text` + `label`, split it, and tokenize it.

Sources: an embedded name (`tweets`), a local CSV / TSV / JSONL / JSON / Parquet file (optionally `.gz`),
a folder holding `train.*` / `validation.*` / `test.*` files, or a Hugging Face hub dataset id.
Every problem with the input becomes an `AfinarError` that names the file, the row or column, and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import ClassLabel, Dataset, Features, Value

from afinar.core import assets
from afinar.core.config import DataArgs
from afinar.core.errors import AfinarError
from afinar.data import cache

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
TEXT_COLUMNS = ("text", "sentence", "content", "review", "tweet", "document", "body", "comment", "message",
                "abstract", "medical_abstract", "sentence1")
LABEL_COLUMNS = ("label", "labels", "label_text", "sentiment", "class", "category", "target",
                 "condition_label", "y")
NAME_COLUMNS = ("label_text", "label_name", "sentiment")  # names beside an integer `label` column
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "passage"),
                ("question", "context"), ("query", "document"), ("text_a", "text_b"), ("text", "text_pair"))
Input = str | tuple[str, str]  # one text, or a sentence pair
MAX_CLASSES = 1000
MISSING_LABELS = ("", "nan", "null", "n/a", "#n/a")  # what spreadsheets and pandas write for no value
URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
MENTION = re.compile(r"(?<!\w)@\w+")

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Normalised splits (`text`: str, `label`: int into `label_names`) and where they came from."""

    train: Dataset
    validation: Dataset | None  # None only before `prepare_splits` carves it from train
    test: Dataset | None
    label_names: list[str]
    sources: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def items(self) -> list[tuple[str, Dataset]]:
        return [(name, ds) for name, ds in (("train", self.train), ("validation", self.validation),
                                            ("test", self.test)) if ds is not None]


def normalise(text: str) -> str:
    """The text as duplicate and leakage checks compare it, for every task: lowercase, no URLs or @mentions,
    spaces collapsed."""
    return " ".join(MENTION.sub(" ", URL.sub(" ", text)).lower().split())


# ---------------------------------------------------------------- reading files


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise AfinarError(f"{path}: unknown file format {''.join(path.suffixes) or '(no extension)'}; "
                          f"use one of {', '.join(FORMATS)} (optionally .gz)")
    return fmt


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text_file(path: Path, encoding: str) -> str:
    """The whole file as text, with a clear error for missing, empty or wrongly encoded files."""
    if not path.is_file():
        raise AfinarError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise AfinarError(f"{path}: not a valid gzip file ({exc})") from None
    if not raw.strip():
        raise AfinarError(f"{path}: file is empty")
    if raw.startswith(b"\xef\xbb\xbf") and encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        raw = raw[3:]  # a byte-order mark (Excel writes one) would stay glued to the first column's name
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AfinarError(f"{path}: line {line} is not valid {encoding} (byte 0x{raw[exc.start]:02x}); "
                          f"set data.encoding (e.g. --set data.encoding=latin-1)") from None
    except LookupError:
        raise AfinarError(f"data.encoding {encoding!r} is not a known text encoding") from None


def _read_delimited(path: Path, text: str, sep: str) -> pd.DataFrame:
    """CSV/TSV through the csv module first, so that ragged rows and broken quotes name their line. A TSV whose
    quotes do not parse as CSV quoting (GLUE's files: quotes are part of the texts) is read with quoting off
    when every row then has the header's width."""
    if sep == "\t":
        try:
            return _read_delimited_as(path, text, sep, csv.QUOTE_MINIMAL)
        except AfinarError as quoted:
            try:
                frame = _read_delimited_as(path, text, sep, csv.QUOTE_NONE)
            except AfinarError:
                raise quoted from None
            log.info("%s: read with quoting off (its quotes are part of the texts)", path)
            return frame
    return _read_delimited_as(path, text, sep, csv.QUOTE_MINIMAL)


def _read_delimited_as(path: Path, text: str, sep: str, quoting: int) -> pd.DataFrame:
    csv.field_size_limit(2**31 - 1)  # long texts are judged by data.max_text_chars, not by the csv module
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True, quoting=quoting)
    try:
        header = next(reader)
        width = len(header)
        for row in reader:
            if row and len(row) != width:
                raise AfinarError(f"{path}: line {reader.line_num} has {len(row)} fields but the header has "
                                  f"{width}; fix the row or quote fields that contain '{sep}'")
    except csv.Error as exc:
        raise AfinarError(f"{path}: broken CSV near line {reader.line_num} ({exc}); "
                          f"check for an unclosed quote") from None
    if len(set(header)) != len(header):
        raise AfinarError(f"{path}: duplicate column names in the header: {', '.join(header)}")
    return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, quoting=quoting)


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AfinarError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise AfinarError(f"{path}: line {number} must be a JSON object with named fields")
        records.append(record)
    return pd.DataFrame.from_records(records)


def read_table(path: str | Path, encoding: str = "utf-8") -> pd.DataFrame:
    """One local file as a DataFrame of raw columns."""
    path = Path(path)
    fmt = file_format(path)
    if fmt == "parquet":
        if not path.is_file():
            raise AfinarError(f"{path}: file not found")
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise AfinarError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    else:
        text = read_text_file(path, encoding)
        if fmt in ("csv", "tsv"):
            frame = _read_delimited(path, text, "," if fmt == "csv" else "\t")
        elif fmt == "jsonl" or (fmt == "json" and not text.lstrip().startswith("[")):
            frame = _read_jsonl(path, text)
        elif fmt == "json":
            try:
                frame = pd.DataFrame.from_records(json.loads(text))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise AfinarError(f"{path}: not a JSON list of records ({exc})") from None
        else:
            raise AfinarError(f"{path}: .txt holds raw text without labels; classification needs "
                              f"CSV, TSV, JSONL, JSON or Parquet")
    if frame.empty:
        raise AfinarError(f"{path}: no rows")
    return frame


# ---------------------------------------------------------------- finding the splits


def find_split_files(folder: Path, suffixes: Sequence[str] = tuple(FORMATS)) -> dict[str, Path]:
    """`train.*`, `dev.*` / `validation.*`, `test.*` (or `*_train.*`, ...) in `folder`, of the given suffixes."""
    found: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        stem = file.name.split(".")[0].lower()
        for split, aliases in SPLIT_ALIASES.items():
            if split not in found and any(stem == a or stem.endswith(f"_{a}") for a in aliases) \
                    and "".join(file.suffixes[-2:]).lower().removesuffix(".gz") in suffixes:
                found[split] = file
    if "train" not in found:
        raise AfinarError(f"{folder}: no train file found (expected train{suffixes[0]}, train{suffixes[1]}, ... or "
                          f"*_train.*)")
    return found


def load_hub_dataset(source: str):
    """`datasets.load_dataset(source)`, or a one-line error when it cannot be reached."""
    from datasets import load_dataset

    try:
        return load_dataset(source)
    except Exception as exc:  # network, auth and not-found errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AfinarError(f"data source {source!r} is not a local file or folder, not an embedded dataset "
                          f"({', '.join(assets.DATASETS)}), and could not be loaded from the Hugging Face hub "
                          f"({first}); check the name, or your connection (HF_HUB_OFFLINE is "
                          f"{'set' if _offline() else 'unset'})") from None


def hub_datasets(source: str, with_test: bool) -> dict[str, Dataset]:
    """The splits of a hub dataset afinar reads, under afinar's names (train, validation, test; test only
    `with_test`); a one-line error when it cannot be reached or has no train split."""
    loaded = load_hub_dataset(source)
    found = {}
    for split, ds in loaded.items():
        name = next((s for s, aliases in SPLIT_ALIASES.items() if split in aliases), None)
        if name is not None and (name != "test" or with_test):
            found[name] = ds
    if "train" not in found:
        raise AfinarError(f"hub dataset {source!r} has no train split (splits: {', '.join(loaded)})")
    return found


def hub_fingerprint(source: str, ds: Dataset) -> str:
    """What the run records of a hub split's content (the `datasets` fingerprint of what was loaded)."""
    return f"hub:{source}:{ds._fingerprint}"


def hub_splits(args: DataArgs, with_test: bool) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]], dict[str, str]]:
    """A hub dataset id through `datasets.load_dataset`; raises a clear error when it cannot be reached."""
    frames, class_names, fingerprints = {}, {}, {}
    for name, ds in hub_datasets(args.source, with_test).items():
        frames[name] = ds.to_pandas()
        fingerprints[name] = hub_fingerprint(args.source, ds)
        for column, feature in ds.features.items():
            if isinstance(feature, ClassLabel):
                class_names[column] = list(feature.names)
    return frames, class_names, fingerprints


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def split_files(args: DataArgs, with_test: bool, suffixes: Sequence[str] = tuple(FORMATS)
                ) -> dict[str, Path] | None:
    """The local file of each split, or None when `args.source` names a hub dataset. Without `with_test` the
    test split is not listed (hyperparameter search must not see it); in a folder, files of `suffixes` count."""
    source = Path(args.source).expanduser()
    if args.source in assets.DATASETS:
        files = assets.dataset_files(args.source)
    elif source.is_dir():
        files = find_split_files(source, suffixes)
    elif source.exists() or source.suffix:  # anything that looks like a file is not a hub id
        files = {"train": source}
    else:
        return None
    for split, path in (("validation", args.validation), ("test", args.test)):
        if path:
            files[split] = Path(path).expanduser()
    if not with_test:
        files.pop("test", None)
    return files


def existing(files: dict[str, Path]) -> dict[str, Path]:
    """`files`, once each is known to exist (else a one-line error naming the first missing one)."""
    for path in files.values():
        if not path.is_file():
            raise AfinarError(f"{path}: file not found")
    return files


def hub_splits_and_files(args: DataArgs, with_test: bool) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]],
                                                                   dict[str, str], dict[str, str]]:
    """DataFrames per split from the hub (plus any local validation/test file), ClassLabel names, source
    descriptions and fingerprints."""
    frames, class_names, fingerprints = hub_splits(args, with_test)
    sources = {split: f"hub:{args.source}" for split in frames}
    for split, path in (("validation", args.validation), ("test", args.test if with_test else None)):
        if path:
            frames[split] = read_table(path, args.encoding)
            sources[split], fingerprints[split] = path, sha256_file(Path(path))
    return frames, class_names, sources, fingerprints


# ---------------------------------------------------------------- columns and labels


def split_frames(args: DataArgs, with_test: bool) -> tuple[dict[str, pd.DataFrame], dict[str, str], dict[str, str]]:
    """Each split's table as the source has it (local files, or the hub plus any local validation/test file), with
    source descriptions and fingerprints: what a task that reads its own columns starts from."""
    files = split_files(args, with_test)
    if files is None:
        frames, _, sources, fingerprints = hub_splits_and_files(args, with_test)
        return frames, sources, fingerprints
    return ({split: read_table(path, args.encoding) for split, path in existing(files).items()},
            {split: str(path) for split, path in files.items()},
            {split: sha256_file(path) for split, path in files.items()})


def pick_column(frame: pd.DataFrame, wanted: str | None, candidates: tuple[str, ...], what: str,
                 where: str, key: str) -> str:
    columns = [str(c) for c in frame.columns]
    if wanted is not None:
        if wanted not in columns:
            raise AfinarError(f"{where}: no column {wanted!r} ({key}); columns seen: {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for candidate in candidates:
        if candidate in lower:
            return lower[candidate]
    raise AfinarError(f"{where}: no {what} column found (columns seen: {', '.join(columns)}); "
                      f"name it with --set {key}=<column>")


def _is_integer_like(values: pd.Series) -> bool:
    try:
        numbers = pd.to_numeric(values)
    except (ValueError, TypeError):
        return False
    return bool(((numbers % 1) == 0).all())


def _label_names(frame: pd.DataFrame, label_column: str, class_names: dict[str, list[str]],
                 where: str) -> tuple[list[str], pd.Series]:
    """The class names, in id order, and the train labels as names."""
    values = frame[label_column]
    if label_column in class_names:
        names = class_names[label_column]
        ids = values.astype(int)
        outside = (ids < 0) | (ids >= len(names))
        if outside.any():  # GLUE-style splits mark hidden labels -1: names[-1] would invent the last class
            raise AfinarError(f"{where}: {int(outside.sum()):,} of {len(ids):,} rows have label id "
                              f"{int(ids[outside].iloc[0])} in column {label_column!r}, outside the {len(names)} "
                              f"classes (-1 marks an unlabelled row); give labelled data for this split, e.g. "
                              f"--set data.test=FILE")
        return names, ids.map(dict(enumerate(names)))
    missing = values.isna() | values.astype(str).str.strip().str.lower().isin(MISSING_LABELS)
    if missing.any():
        row = int(missing.to_numpy().argmax())
        value = values.iloc[row]
        kind = "an empty label" if pd.isna(value) or not str(value).strip() else f"a missing label ({value!r})"
        raise AfinarError(f"{where}: row {row + 1} has {kind} in column {label_column!r}; label the row or "
                          f"remove it")
    if _is_integer_like(values):
        ids = pd.to_numeric(values).astype(int)
        companion = next((c for c in frame.columns if c in NAME_COLUMNS and c != label_column), None)
        if companion is not None and frame.groupby(ids)[companion].nunique().max() == 1:
            by_id = frame.groupby(ids)[companion].first().sort_index()
            if by_id.is_unique:
                return [str(n) for n in by_id], ids.map(by_id.astype(str))  # a Series lookup, not a Python call per row
        names = [str(i) for i in sorted(ids.unique())]
        return names, ids.astype(str)
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().mean() > 0.9:
        raise AfinarError(f"{where}: label column {label_column!r} holds non-integer numbers "
                          f"(e.g. {values.iloc[int(numeric.notna().to_numpy().argmax())]!r}); afinar classifies, "
                          f"so labels must be class names or integer ids")
    names = sorted(values.astype(str).unique())
    return names, values.astype(str)


def _normalise(frame: pd.DataFrame, args: DataArgs, where: str, class_names: dict[str, list[str]],
               label_names: list[str] | None) -> tuple[pd.DataFrame, list[str]]:
    text_column, pair_column = text_columns(frame, args, where)
    label_column = pick_column(frame, args.label_column,
                                tuple(c for c in LABEL_COLUMNS if c not in (text_column, pair_column)), "label",
                                where, "data.label_column")
    if label_column in (text_column, pair_column):
        raise AfinarError(f"{where}: column {label_column!r} is both a text and the label")
    texts = _text_values(frame[text_column], args, where)
    pairs = None if pair_column is None else _text_values(frame[pair_column], args, where)
    names, row_names = _label_names(frame, label_column, class_names, where)
    if label_names is None:
        _refuse_label_sets(row_names.astype(str), label_column, where)
        label_names = names
        if len(label_names) < 2:
            raise AfinarError(f"{where}: only one class ({label_names[0]!r}) in column {label_column!r}; "
                              f"classification needs at least two")
        if len(label_names) > min(MAX_CLASSES, max(20, len(frame) // 2)):
            raise AfinarError(f"{where}: label column {label_column!r} has {len(label_names):,} distinct values in "
                              f"{len(frame):,} rows; that looks like free text or ids, not class labels: "
                              f"set data.label_column")
    index = {name: i for i, name in enumerate(label_names)}
    unknown = ~row_names.isin(index.keys())
    if unknown.any():
        row = int(unknown.to_numpy().argmax())
        raise AfinarError(f"{where}: row {row + 1} has label {row_names.iloc[row]!r}, which train never has "
                          f"(train labels: {', '.join(label_names)})")
    columns = {"text": texts.to_numpy(), **({} if pairs is None else {"text_pair": pairs.to_numpy()}),
               "label": row_names.map(index).to_numpy()}
    return pd.DataFrame(columns), label_names


def _refuse_label_sets(labels: pd.Series, column: str, where: str) -> None:
    """Labels such as `3,15` whose parts are (mostly) labels of their own are label sets: trained as classes of
    their own, they would make a silently wrong model."""
    joined = labels.str.contains(r"[,|]", regex=True)
    if joined.mean() <= 0.01:
        return
    parts = {part.strip() for value in labels[joined] for part in re.split(r"[,|]", value)}
    if len(parts & set(labels[~joined])) >= 0.8 * len(parts):  # most parts are labels of their own
        raise AfinarError(f"{where}: {int(joined.sum()):,} rows of column {column!r} hold several labels (e.g. "
                          f"{labels[joined].iloc[0]!r}): this is multi-label data; set task=multilabel")


def text_columns(frame: pd.DataFrame, args: DataArgs, where: str) -> tuple[str, str | None]:
    """The text column and, for sentence pairs, the second text's: `data.text_pair_column`, or a known pair of
    column names (sentence1/sentence2, premise/hypothesis, question/passage, ...) when no text column is set."""
    lower = {str(c).lower(): str(c) for c in frame.columns}
    if args.text_pair_column is not None:
        if args.text_pair_column not in lower.values():
            raise AfinarError(f"{where}: no column {args.text_pair_column!r} (data.text_pair_column); columns seen: "
                              f"{', '.join(map(str, frame.columns))}")
        first = pick_column(frame, args.text_column, tuple(c for c in TEXT_COLUMNS
                                                           if c != args.text_pair_column.lower()),
                            "text", where, "data.text_column")
        return first, args.text_pair_column
    if args.text_column is None:
        for first, second in PAIR_COLUMNS:
            if first in lower and second in lower:
                return lower[first], lower[second]
    return pick_column(frame, args.text_column, TEXT_COLUMNS, "text", where, "data.text_column"), None


def _text_values(column: pd.Series, args: DataArgs, where: str) -> pd.Series:
    texts = column.map(lambda t: "" if t is None or (isinstance(t, float) and pd.isna(t)) else str(t))
    too_long = texts.str.len() > args.max_text_chars
    if too_long.any():
        row = int(too_long.to_numpy().argmax())
        raise AfinarError(f"{where}: row {row + 1} has a text of {len(texts.iloc[row]):,} characters "
                          f"(limit data.max_text_chars={args.max_text_chars:,}); remove it or raise the limit")
    return texts


def _to_dataset(frame: pd.DataFrame, label_names: list[str]) -> Dataset:
    pair = {"text_pair": Value("string")} if "text_pair" in frame.columns else {}
    features = Features({"text": Value("string"), **pair, "label": ClassLabel(names=label_names)})
    return Dataset.from_pandas(frame[list(features)], features=features, preserve_index=False)


def inputs(ds: Dataset) -> list[Input]:
    """What a model reads per row: the text, or the (text, text_pair) sentence pair."""
    if "text_pair" in ds.column_names:
        columns = ds.select_columns(["text", "text_pair"])[:]
        return list(zip(columns["text"], columns["text_pair"]))
    return list(ds["text"])


def has_pairs(ds: Dataset) -> bool:
    return "text_pair" in ds.column_names


def select_rows(ds: Dataset, rows: list[int]) -> Dataset:
    """`ds.select(rows)` with a fingerprint from a hash of the row numbers: `datasets` would otherwise pickle
    the whole list to fingerprint it, a second per 25k rows."""
    digest = hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes())
    digest.update(ds._fingerprint.encode())  # a selection of a selection: still one short fingerprint
    return ds.select(rows, new_fingerprint=digest.hexdigest()[:32])


def carve_rows(n: int, fraction: float, seed: int, labels: Sequence | None = None
               ) -> tuple[list[int], list[int], str]:
    """Row numbers kept in train and held out as validation (a seeded `fraction`), stratified by `labels` when
    given and every class can be; and how it was done, for the notes. Every task carves through here."""
    from sklearn.model_selection import train_test_split

    if n - math.ceil(n * fraction) < 1:  # scikit-learn holds out ceil(n x fraction) rows
        raise AfinarError(f"{n} training rows (or contexts) are too few to carve a {fraction:.0%} validation split "
                          f"from; give a validation file (data.validation) or more rows")
    rows = list(range(n))
    if labels is not None:
        try:
            kept, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=labels)
            return kept, held, "stratified"
        except ValueError:  # a class too small to stratify
            pass
    kept, held = train_test_split(rows, test_size=fraction, random_state=seed)
    return kept, held, "random" if labels is None else "random (a class is too small to stratify)"


def subset_rows(n: int, limit: int | None, seed: int) -> list[int] | None:
    """The rows of a seeded subset of `limit` out of `n`, in the order the tutorial's
    `ds.shuffle(seed).select(range(limit))` takes them; None when nothing needs dropping. Every task subsets here."""
    if limit is None or limit >= n:
        return None
    return np.random.default_rng(seed).permutation(n)[:limit].tolist()


def class_balanced_order(labels: Sequence[int], seed: int, per_class: int) -> tuple[list[int], int]:
    """Every row, ordered so that the first ones hold `per_class` rows of each class (all of a smaller class) and
    the rest follow in the seeded shuffle order; and how many rows that balanced head has. Each prefix of the
    order is a nested seeded subset: `data.train_per_class` takes the head, `afinar curve` growing prefixes."""
    counts: Counter = Counter()
    head, tail = [], []
    for row in np.random.default_rng(seed).permutation(len(labels)).tolist():
        (head if counts[labels[row]] < per_class else tail).append(row)
        counts[labels[row]] += 1
    return head + tail, len(head)


def _carve_validation(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset, str]:
    labels = train.select_columns("label")[:]["label"]  # one slice: row-by-row column access is slow
    kept, held, how = carve_rows(len(train), fraction, seed, labels)
    note = f"validation carved from train: {len(held):,} rows ({fraction:.0%}, {how}, seed {seed})"
    return select_rows(train, kept), select_rows(train, held), note


def subset_list(items: list, limit: int | None, seed: int) -> list:
    """A seeded subset (`subset_rows`) of a list of records (sentences, questions), in the subset's order."""
    rows = subset_rows(len(items), limit, seed)
    return items if rows is None else [items[i] for i in rows]


def cell_list(value: Any, where: str, column: str) -> list:
    """A list stored as itself (JSONL, Parquet, hub) or as JSON text (CSV, TSV); else a one-line error."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise AfinarError(f"{where}: column {column!r} holds text that is not a JSON list") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list):
        raise AfinarError(f"{where}: column {column!r} must hold a list (got {type(value).__name__})")
    return value


def _subset(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded subset (`subset_rows`); the whole split when it is already small enough."""
    rows = subset_rows(len(ds), limit, seed)
    return ds if rows is None else select_rows(ds, rows)


def read_splits(args: DataArgs, with_test: bool = True) -> Splits:
    """The splits as the source has them, normalised; `validation` is None when the source has none. Local
    files are read once: the normalised splits are cached under the hash of the files' bytes and the reading
    settings (`afinar.data.cache`)."""
    files = split_files(args, with_test)
    if files is None:
        frames, class_names, sources, fingerprints = hub_splits_and_files(args, with_test)
        datasets, label_names = _normalise_splits(frames, class_names, sources, args)
    else:
        for path in files.values():
            if not path.is_file():
                raise AfinarError(f"{path}: file not found")
        sources = {split: str(path) for split, path in files.items()}
        fingerprints = {split: sha256_file(path) for split, path in files.items()}
        key = cache.digest("splits", fingerprints, args.text_column, args.label_column, args.encoding,
                           args.max_text_chars)

        def read() -> tuple[dict[str, Dataset], dict]:
            frames = {split: read_table(path, args.encoding) for split, path in files.items()}
            datasets, label_names = _normalise_splits(frames, {}, sources, args)
            return datasets, {"label_names": label_names}

        datasets, meta, hit = cache.cached_datasets(key, read)
        label_names = meta["label_names"]
        if hit:
            log.info("data read from the cache (files with the same bytes were read before)")
    return Splits(datasets["train"], datasets.get("validation"), datasets.get("test"), label_names,
                  sources, fingerprints, [])


def _normalise_splits(frames: dict[str, pd.DataFrame], class_names: dict[str, list[str]], sources: dict[str, str],
                      args: DataArgs) -> tuple[dict[str, Dataset], list[str]]:
    train, label_names = _normalise(frames["train"], args, sources["train"], class_names, None)
    datasets = {"train": _to_dataset(train, label_names)}
    for split in ("validation", "test"):
        if split in frames:
            frame, _ = _normalise(frames[split], args, sources[split], class_names, label_names)
            datasets[split] = _to_dataset(frame, label_names)
    return datasets, label_names


def prepare_splits(splits: Splits, args: DataArgs, seed: int) -> Splits:
    """Carve validation from train when there is none (seeded, stratified), then take the seeded subsets."""
    splits = dataclasses.replace(splits, notes=list(splits.notes), sources=dict(splits.sources))
    if splits.validation is None:
        splits.train, splits.validation, note = _carve_validation(splits.train, args.validation_fraction, seed)
        splits.sources["validation"] = f"{splits.sources['train']} (carved)"
        splits.notes.append(note)
    if args.train_per_class:
        order, balanced = class_balanced_order(splits.train.select_columns("label")[:]["label"], seed,
                                               args.train_per_class)
        if balanced < len(splits.train):
            splits.notes.append(f"train: seeded class-balanced subset of {balanced:,} of {len(splits.train):,} rows "
                                f"(up to {args.train_per_class} per class)")
            splits.train = select_rows(splits.train, order[:balanced])
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_test_samples}
    for split, ds in splits.items():
        subset = _subset(ds, limits[split], seed)
        if len(subset) < len(ds):
            setattr(splits, split, subset)
            splits.notes.append(f"{split}: seeded subset of {len(subset):,} of {len(ds):,} rows")
    if splits.test is None:
        splits.notes.append("no test split: final metrics are reported on validation only")
    return splits


def load_splits(args: DataArgs, seed: int = 42, with_test: bool = True) -> Splits:
    """Read, normalise, split and subset the data; the test split is loaded here but only scored at the end."""
    return prepare_splits(read_splits(args, with_test), args, seed)


def load_labelled_file(path: str | Path, args: DataArgs, label_names: list[str]) -> Dataset:
    """A labelled file scored against an existing label space (re-evaluating a saved run)."""
    frame, _ = _normalise(read_table(path, args.encoding), args, str(path), {}, label_names)
    return _to_dataset(frame, label_names)


def read_texts(path: str | Path, args: DataArgs, pairs: bool = False) -> list[Input]:
    """Inputs to predict: a .txt file (one per line) or any table with a text column; with `pairs`, a table's
    two text columns (`text_columns`) as sentence pairs."""
    path = Path(path)
    if file_format(path) == "txt":
        if pairs:
            raise AfinarError(f"{path}: this model reads sentence pairs; give a table with two text columns")
        return [line for line in read_text_file(path, args.encoding).splitlines() if line.strip()]
    frame = read_table(path, args.encoding)
    first, second = text_columns(frame, args, str(path))
    if pairs != (second is not None):
        raise AfinarError(f"{path}: " + ("this model reads sentence pairs; the file has one text column "
                                         "(name the second with data.text_pair_column)" if pairs else
                                         f"this model reads one text; the file holds pairs ({first}, {second})"))
    texts = frame[first].fillna("").astype(str).tolist()
    return list(zip(texts, frame[second].fillna("").astype(str).tolist())) if pairs else texts


# ---------------------------------------------------------------- raw text (causal-LM documents)


def split_documents(text: str) -> list[str]:
    """Blank-line separated blocks when some block spans several lines (paragraphs), else one per line."""
    blocks = [b.strip() for b in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n")) if b.strip()]
    if len(blocks) > 1 and any("\n" in block for block in blocks):
        return blocks
    return [line.strip() for line in text.splitlines() if line.strip()]


def _documents(frame: pd.DataFrame, text_column: str | None, where: str) -> list[str]:
    column = pick_column(frame, text_column, TEXT_COLUMNS, "text", where, "data.text_column")
    return [t.strip() for t in frame[column].fillna("").astype(str) if t.strip()]


def read_documents(path: str | Path, encoding: str = "utf-8", text_column: str | None = None) -> list[str]:
    """Documents from a .txt file (see `split_documents`) or from the text column of a CSV/JSONL/... table."""
    path = Path(path).expanduser()
    if file_format(path) == "txt":
        documents = split_documents(read_text_file(path, encoding))
    else:
        documents = _documents(read_table(path, encoding), text_column, str(path))
    if not documents:
        raise AfinarError(f"{path}: no text in it")
    return documents


@dataclass
class TextSplits:
    """Documents per split and where they came from (sources, sha256 fingerprints, notes on changes)."""

    train: list[str]
    validation: list[str]
    test: list[str] | None
    sources: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def items(self) -> list[tuple[str, list[str]]]:
        return [(n, d) for n, d in (("train", self.train), ("validation", self.validation), ("test", self.test))
                if d is not None]

    def as_rows(self) -> Splits:
        """The documents as rows of one class ("document"), for the data checks labelled rows go through."""
        def rows(docs: list[str] | None) -> Dataset | None:
            return None if docs is None else _to_dataset(pd.DataFrame({"text": docs, "label": 0}), ["document"])

        return Splits(rows(self.train), rows(self.validation), rows(self.test), ["document"], dict(self.sources),
                      dict(self.fingerprints), list(self.notes))


def read_text_splits(args: DataArgs, with_test: bool = True) -> TextSplits:
    """Train / validation (/ test) documents as the source has them, from the same sources as labelled data (a
    file, a folder of split files, an embedded name, a hub dataset); validation is None when there is none."""
    files = split_files(args, with_test)
    if files is None:
        frames, _, sources, fingerprints = hub_splits_and_files(args, with_test)
        documents = {split: _documents(frame, args.text_column, f"{sources[split]} ({split})")
                     for split, frame in frames.items()}
    else:
        for path in files.values():
            if not path.is_file():
                raise AfinarError(f"{path}: file not found")
        documents = {split: read_documents(path, args.encoding, args.text_column) for split, path in files.items()}
        sources = {split: str(path) for split, path in files.items()}
        fingerprints = {split: sha256_file(path) for split, path in files.items()}
    return TextSplits(documents["train"], documents.get("validation"), documents.get("test"), sources, fingerprints)


def prepare_texts(splits: TextSplits, args: DataArgs, seed: int) -> TextSplits:
    """Carve validation from train when there is none and take the seeded subsets, by the rules labelled data
    follows (`carve_rows`, `subset_rows`); documents stay in file order."""
    splits = dataclasses.replace(splits, notes=list(splits.notes), sources=dict(splits.sources))
    if not splits.train:
        raise AfinarError(f"{splits.sources['train']}: no training documents left after the data checks")
    if splits.validation is None:
        if len(splits.train) < 2:
            raise AfinarError(f"{splits.sources['train']}: one document cannot be split into train and validation; "
                              f"add documents or give data.validation")
        kept, held, how = carve_rows(len(splits.train), args.validation_fraction, seed)
        splits.train, splits.validation = ([splits.train[i] for i in sorted(rows)] for rows in (kept, held))
        splits.sources["validation"] = f"{splits.sources['train']} (carved)"
        splits.notes.append(f"validation carved from train: {len(held):,} documents ({args.validation_fraction:.0%}, "
                            f"{how}, seed {seed})")
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                         ("test", args.max_test_samples)):
        docs = getattr(splits, split)
        rows = subset_rows(len(docs), limit, seed) if docs is not None else None
        if rows is not None:
            setattr(splits, split, [docs[i] for i in sorted(rows)])
            splits.notes.append(f"{split}: seeded subset of {limit:,} of {len(docs):,} documents")
    return splits


# ---------------------------------------------------------------- tokenization


def encode(tokenizer, texts: Sequence[Input], max_length: int) -> dict[str, list]:
    """Truncate but never pad (the collator pads each batch to its own longest row). Sentence pairs go to the
    tokenizer as pairs, the longer side truncated first (token type ids and [SEP] for encoders); a tokenizer
    without a separator token (decoders) gets its EOS token between the two. An empty text becomes one pad/eos
    token, because tokenizers without special tokens (GPT-2) would give a zero-length row."""
    if texts and isinstance(texts[0], tuple):
        joiner = "" if tokenizer.sep_token is not None else tokenizer.eos_token or ""
        encoded = tokenizer([a for a, _ in texts], [joiner + b for _, b in texts], truncation="longest_first",
                            max_length=max_length)
    else:
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    filler = tokenizer.pad_token_id
    for row, ids in enumerate(encoded["input_ids"]):
        if not ids:
            encoded["input_ids"][row] = [filler]
            encoded["attention_mask"][row] = [1]
            if "token_type_ids" in encoded:
                encoded["token_type_ids"][row] = [0]
    return dict(encoded)


def padded_batches(tokenizer, texts: Sequence[Input], batch_size: int, max_length: int, return_tensors: str
                   ) -> Iterator[tuple[list[int], Any]]:
    """Texts (or sentence pairs) in batches of similar length (little padding), each tokenized and padded to its
    own longest row, with the input positions it holds, so callers write results back in input order."""
    order = sorted(range(len(texts)), key=lambda i: sum(map(len, texts[i])) if isinstance(texts[i], tuple)
                   else len(texts[i]))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield index, tokenizer.pad(encode(tokenizer, [texts[i] for i in index], max_length),
                                   return_tensors=return_tensors)


def tokenize(ds: Dataset, tokenizer, max_length: int, use_cache: bool = True) -> Dataset:
    """`datasets.map(batched=True)` over `encode`, plus a `length` column for length-grouped batches; kept in the
    on-disk cache (`afinar.data.cache`), so the same rows with the same tokenizer are tokenized once."""
    def encode_batch(batch: dict) -> dict:
        texts = list(zip(batch["text"], batch["text_pair"])) if "text_pair" in batch else batch["text"]
        encoded = encode(tokenizer, texts, max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    key = cache.digest("tokenized", cache.dataset_digest(ds), cache.tokenizer_digest(tokenizer), max_length)
    text_columns = [c for c in ("text", "text_pair") if c in ds.column_names]
    tokenized, hit = cache.cached_map(ds, key, encode_batch, text_columns, "tokenizing", use_cache)
    if hit:
        log.info("tokenized %s rows: from the cache", f"{len(ds):,}")
    return tokenized
