"""Tagged sentences for token classification (named entities and any BIO/IOB2 tagging): reading them, checking
their tags, and cutting them into model windows.

Formats: CoNLL-style files (`.conll`, `.iob`, `.bio`, `.txt`, `.tsv`: a token and its tag per line, tab- or
whitespace-separated, the tag in the last column or `tagging.tag_column`; a blank or whitespace-only line between
sentences; `-DOCSTART-` lines skipped), JSONL / JSON / Parquet records with `tokens` and `tags` (or `ner_tags`,
`labels`) lists, and hub datasets with `tokens` and `ner_tags` (a sequence of `ClassLabel`s, whose names are
the tags).

A sentence longer than `data.max_length` sub-tokens is never cut: it is split into windows of whole words that
overlap by about `tagging.overlap` sub-tokens, and every word is labelled (and later predicted) in exactly one
window, the one where it has the most context on both sides. Labels sit on a word's first sub-token; the rest,
and the special tokens, get -100 (the ignore index `DataCollatorForTokenClassification` pads with).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from afinar.core.config import DataArgs, TaggingArgs
from afinar.core.errors import AfinarError
from afinar.data.sources import (
    Splits,
    cell_list,
    existing,
    hub_datasets,
    hub_fingerprint,
    read_table,
    read_text_file,
    sha256_file,
    split_files,
)

CONLL_SUFFIXES = (".conll", ".iob", ".bio", ".txt", ".tsv", ".iob2", ".conllu")
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
TOKEN_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("tags", "ner_tags", "labels", "tag", "ner")
IGNORE = -100
OUTSIDE = "O"


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]


@dataclass
class TaggedSplits:
    """Sentences per split, the tag names (train's, `O` first, then by type and B before I) and provenance."""

    train: list[Sentence]
    validation: list[Sentence] | None
    test: list[Sentence] | None
    tag_names: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def items(self) -> list[tuple[str, list[Sentence]]]:
        return [(name, s) for name, s in (("train", self.train), ("validation", self.validation),
                                          ("test", self.test)) if s is not None]

    def as_rows(self) -> Splits:
        """Each sentence as one row of text (its tokens joined by spaces), for the checks every task shares: empty,
        damaged, duplicated and leaked sentences."""
        from datasets import Dataset

        def rows(sentences: list[Sentence] | None):
            return None if sentences is None else Dataset.from_dict(
                {"text": [" ".join(s.tokens) for s in sentences], "label": [0] * len(sentences)})

        return Splits(rows(self.train), rows(self.validation), rows(self.test), ["sentence"], self.sources,
                      self.fingerprints, list(self.notes))


# ---------------------------------------------------------------- reading


def read_conll(path: Path, encoding: str = "utf-8", tag_column: str | None = None) -> list[Sentence]:
    """Sentences of a CoNLL-style file. A line that has a token but no tag is an error naming its line."""
    index = -1 if tag_column is None else _column_index(tag_column, path)
    sentences, tokens, tags = [], [], []
    for number, line in enumerate(read_text_file(path, encoding).splitlines(), start=1):
        if not line.strip():
            if tokens:
                sentences.append(Sentence(tokens, tags))
                tokens, tags = [], []
            continue
        fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2 or not (-len(fields) <= index < len(fields)) or index in (0, -len(fields)):
            column = index if index >= 0 else "last"
            raise AfinarError(f"{path}:{number}: expected a token and its tag (column {column}), got "
                              f"{line.strip()[:80]!r}; separate them with a tab or spaces, or set tagging.tag_column")
        tokens.append(fields[0])
        tags.append(fields[index])
    if tokens:
        sentences.append(Sentence(tokens, tags))
    if not sentences:
        raise AfinarError(f"{path}: no tagged sentences (expected token and tag per line, blank lines between "
                          f"sentences)")
    return sentences


def _column_index(tag_column: str, path: Path) -> int:
    try:
        return int(tag_column)
    except ValueError:
        raise AfinarError(f"tagging.tag_column={tag_column!r}: {path} is a CoNLL file, whose columns have no names;"
                          f" give the tag's column number (0 is the token, -1 the last)") from None


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise AfinarError(f"{where}: no column {wanted!r} for the {what} (columns: {', '.join(columns)})")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise AfinarError(f"{where}: no {what} column (looked for {', '.join(candidates)}; columns: "
                          f"{', '.join(columns)}); set tagging.tag_column or rename it")
    return found


def frame_sentences(frame: pd.DataFrame, where: str, tag_column: str | None = None,
                    tag_names: list[str] | None = None) -> list[Sentence]:
    """Sentences from records with a token list and a tag list per row; integer tags are indices into
    `tag_names` (a hub dataset's ClassLabel names)."""
    columns = [str(c) for c in frame.columns]
    token_column = _pick(columns, None, TOKEN_COLUMNS, "tokens", where)
    tags_column = _pick(columns, tag_column, TAG_COLUMNS, "tags", where)
    sentences = []
    for number, (tokens, tags) in enumerate(zip(frame[token_column], frame[tags_column])):
        here = f"{where} row {number}"
        tokens, tags = cell_list(tokens, here, token_column), cell_list(tags, here, tags_column)
        if len(tokens) != len(tags):
            raise AfinarError(f"{here}: {len(tokens)} tokens but {len(tags)} tags; give one tag per token")
        if tags and all(isinstance(t, (int, np.integer)) for t in tags):
            if tag_names is None:
                raise AfinarError(f"{here}: tags are numbers, and no tag names came with them; write the tags as "
                                  f"names (B-PER, I-PER, O)")
            if max(tags) >= len(tag_names) or min(tags) < 0:
                raise AfinarError(f"{here}: tag number {max(tags)} has no name (the names: {', '.join(tag_names)})")
            tags = [tag_names[t] for t in tags]
        sentences.append(Sentence([str(t) for t in tokens], [str(t) for t in tags]))
    return sentences


def read_tagged_file(path: Path, args: DataArgs, tagging: TaggingArgs) -> list[Sentence]:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in TABLE_SUFFIXES:
        return frame_sentences(read_table(path, args.encoding), str(path), tagging.tag_column)
    if suffix in CONLL_SUFFIXES or not suffix:
        return read_conll(path, args.encoding, tagging.tag_column)
    raise AfinarError(f"{path}: unknown tagged-data format {suffix!r}; use a CoNLL file ({', '.join(CONLL_SUFFIXES)})"
                      f" or records with tokens and tags ({', '.join(TABLE_SUFFIXES)})")


def _hub_sentences(args: DataArgs, tagging: TaggingArgs, with_test: bool) -> tuple[dict, dict, dict]:
    from datasets import Sequence

    sentences, sources, fingerprints = {}, {}, {}
    for name, ds in hub_datasets(args.source, with_test).items():
        where = f"hub:{args.source} {name}"
        column = _pick(list(ds.column_names), tagging.tag_column, TAG_COLUMNS, "tags", where)
        feature = ds.features[column]
        inner = getattr(feature, "feature", None) if isinstance(feature, Sequence) else \
            (feature[0] if isinstance(feature, list) and feature else None)
        names = list(inner.names) if hasattr(inner, "names") else None
        sentences[name] = frame_sentences(ds.to_pandas(), where, column, names)
        sources[name], fingerprints[name] = f"hub:{args.source}", hub_fingerprint(args.source, ds)
    return sentences, sources, fingerprints


def read_tagged_splits(args: DataArgs, tagging: TaggingArgs, with_test: bool = True) -> TaggedSplits:
    """Sentences per split as given (nothing dropped, carved or repaired), with train's tag names."""
    files = split_files(args, with_test, CONLL_SUFFIXES + TABLE_SUFFIXES)
    if files is None:
        sentences, sources, fingerprints = _hub_sentences(args, tagging, with_test)
    else:
        sentences = {split: read_tagged_file(path, args, tagging) for split, path in existing(files).items()}
        sources = {split: str(path) for split, path in files.items()}
        fingerprints = {split: sha256_file(path) for split, path in files.items()}
    return TaggedSplits(sentences["train"], sentences.get("validation"), sentences.get("test"),
                        tag_names(sentences["train"]), sources, fingerprints)


# ---------------------------------------------------------------- tags


def entity_type(tag: str) -> str | None:
    return None if tag == OUTSIDE else tag[2:]


def tag_names(sentences: list[Sentence]) -> list[str]:
    """`O` first, then B- and I- of each type, types sorted: the same ids for the same tag set."""
    types = sorted({entity_type(t) for s in sentences for t in s.tags} - {None})
    return [OUTSIDE] + [f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")]


def check_scheme(sentences: list[Sentence], where: str) -> None:
    """Every tag is `O`, `B-TYPE` or `I-TYPE`; an error names the first other one and where it is."""
    for number, sentence in enumerate(sentences):
        for tag in sentence.tags:
            if tag != OUTSIDE and not re.fullmatch(r"[BI]-\S+", tag):
                raise AfinarError(f"{where} sentence {number}: tag {tag!r} is not IOB2 (O, B-TYPE, I-TYPE); convert "
                                  f"the tags (IOBES or bare types are not read)")


def invalid_transitions(tags: list[str]) -> list[int]:
    """Positions of `I-X` that do not continue an `X` entity (after `O`, after `B-Y`/`I-Y`, or first)."""
    return [i for i, tag in enumerate(tags) if tag.startswith("I-")
            and (i == 0 or tags[i - 1] == OUTSIDE or entity_type(tags[i - 1]) != entity_type(tag))]


def repair_transitions(tags: list[str]) -> list[str]:
    """Each invalid `I-X` becomes `B-X` (the start of the entity it must be)."""
    fixed = list(tags)
    for i in invalid_transitions(tags):
        fixed[i] = "B-" + tags[i][2:]
    return fixed


def unseen_tags(splits: TaggedSplits) -> dict[str, list[str]]:
    """Tags of validation/test that train never has: the model cannot predict them."""
    known = set(splits.tag_names)
    return {name: sorted({t for s in sentences for t in s.tags} - known)
            for name, sentences in splits.items() if name != "train"}


def entities(tags: list[list[str]]) -> list[list[tuple[int, int, str]]]:
    """(start word, end word, type) of each entity of each sentence, as seqeval's strict IOB2 mode reads them: an
    entity starts with `B-X` and continues with `I-X`; an `I-X` without its `B-X` starts none."""
    from seqeval.scheme import IOB2, Entities

    return [[(e.start, e.end, e.tag) for e in sentence] for sentence in Entities(tags, IOB2, suffix=False).entities]


def tag_counts(sentences: list[Sentence]) -> dict[str, int]:
    """Entities per type, as strict scoring counts them (`entities`: an invalid `I-` starts none)."""
    counts: dict[str, int] = {}
    for spans in entities([s.tags for s in sentences]):
        for _, _, kind in spans:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------- windows


@dataclass
class Windows:
    """Model inputs for a list of sentences: one row per window; `words[i]` lists (sentence, word) of the words
    labelled in window i, in the order of their labelled positions."""

    encodings: dict[str, list]
    words: list[list[tuple[int, int]]]
    split_sentences: int  # sentences longer than one window
    cut_words: int  # single words longer than a whole window (their tail sub-tokens dropped)

    def __len__(self) -> int:
        return len(self.words)


def _word_spans(lengths: list[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Windows [start, end) of whole words, each at most `budget` sub-tokens (a longer word alone), consecutive ones
    sharing the whole words that fit in `stride` sub-tokens, each reaching at least one word the last did not."""
    spans, start, n = [], 0, len(lengths)
    while True:
        end, used = start, 0
        while end < n and (used + lengths[end] <= budget or end == start):
            used += lengths[end]
            end += 1
        spans.append((start, end))
        if end >= n:
            return spans
        back, overlap = end, 0
        while back - 1 > start and overlap + lengths[back - 1] <= stride:
            back -= 1
            overlap += lengths[back]
        # the next window must reach a new word: when the overlap leaves it no room for word `end`, none
        start = back if back > start and overlap + lengths[end] <= budget else end


def _owners(spans: list[tuple[int, int]], n: int) -> list[int]:
    """For each word, the window where it has the most words of context on its nearer side."""
    owner = [0] * n
    best = [-1] * n
    for w, (start, end) in enumerate(spans):
        for i in range(start, end):
            context = min(i - start, end - 1 - i)
            if context > best[i]:
                best[i], owner[i] = context, w
    return owner


def encode_windows(tokenizer, sentences: list[list[str]], max_length: int, stride: int,
                   tags: list[list[int]] | None = None) -> Windows:
    """Windows of whole words within `max_length` sub-tokens (special tokens included); labels (from `tags`,
    ids per word) on the first sub-token of each word the window owns, -100 elsewhere."""
    if not getattr(tokenizer, "is_fast", False):
        raise AfinarError("token classification maps words to sub-tokens (word_ids), which needs a fast tokenizer "
                          "(tokenizer.json); this model's has none")
    budget = max_length - tokenizer.num_special_tokens_to_add()
    if budget < 1:
        raise AfinarError(f"data.max_length={max_length} leaves no room for a word after the special tokens")
    pieces = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False) if sentences else None
    windows: list[tuple[int, int, int]] = []  # (sentence, start word, end word)
    owned: list[list[int]] = []
    split = cut = 0
    for s, words in enumerate(sentences):
        lengths = np.bincount([w for w in pieces.word_ids(s) if w is not None], minlength=len(words)).tolist() \
            if words else []
        lengths = [max(1, n) for n in lengths]  # a word the tokenizer drops still gets a window position
        cut += sum(n > budget for n in lengths)
        spans = _word_spans(lengths, budget, stride) if words else []  # an empty sentence has no window
        split += len(spans) > 1
        owner = _owners(spans, len(words))
        for w, (start, end) in enumerate(spans):
            mine = [i for i in range(start, end) if owner[i] == w]
            if mine:  # a window that labels no word would only cost a forward pass (and alone, a NaN loss)
                windows.append((s, start, end))
                owned.append(mine)
    texts = [sentences[s][start:end] for s, start, end in windows]
    batch = tokenizer(texts, is_split_into_words=True, truncation=True, max_length=max_length) if texts else None
    encodings = {key: list(values) for key, values in batch.items()} if batch else {"input_ids": []}
    labels, words = [], []
    for row, (s, start, end) in enumerate(windows):
        mine = set(owned[row])
        seen: set[int] = set()
        row_labels, row_words = [], []
        for word in batch.word_ids(row):
            index = None if word is None else start + word
            if index is None or index in seen or index not in mine:
                row_labels.append(IGNORE)
                continue
            seen.add(index)
            row_labels.append(tags[s][index] if tags is not None else 0)
            row_words.append((s, index))
        labels.append(row_labels)
        words.append(row_words)
    encodings["labels"] = labels
    return Windows(encodings, words, split, cut)


def words_per_sentence(windows: Windows, predictions: list[list[int]], sentence_lengths: list[int],
                       fill: int = 0) -> list[list[int]]:
    """Predicted ids per word of each sentence from the windows' labelled positions (a word the tokenizer dropped
    gets `fill`, the `O` tag)."""
    out = [[fill] * n for n in sentence_lengths]
    for row_words, row_predictions in zip(windows.words, predictions):
        for (s, i), value in zip(row_words, row_predictions):
            out[s][i] = value
    return out
