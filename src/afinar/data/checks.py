"""Data checks before training: a quality report, and a guard against train rows leaking into held-out splits.

A score on test means little when test texts were trained on, so leakage is looked for twice: exactly (after
`normalise`, which removes what a copy or a retweet changes: case, spacing, URLs, @mentions) and as
near-duplicates (character n-gram MinHash with LSH banding, each candidate pair then verified with the true
Jaccard similarity, so nothing is reported that is not over the threshold). `apply_policies` turns the report
into action: it only ever removes *train* rows, and notes each removal in `Splits.notes`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from afinar.core.config import CheckArgs, Config, TrainArgs
from afinar.core.errors import AfinarError
from afinar.core.models import load_tokenizer
from afinar.data import cache
from afinar.data.sources import (
    Splits,
    TextSplits,
    normalise,
    prepare_splits,
    prepare_texts,
    read_splits,
    read_text_splits,
    select_rows,
)

# UTF-8 bytes decoded as latin-1 or cp1252: a lead byte followed by continuation bytes (0x80-0xBF) seen as
# those code pages show them ('Ã©' for 'é', 'â€™' for '’', 'ï¿½' for a replacement character).
_CONTINUATION = re.escape("".join(map(chr, range(0x80, 0xC0)))
                          + bytes(range(0x80, 0xC0)).decode("cp1252", "ignore"))
MOJIBAKE = f"[\xc2-\xdf][{_CONTINUATION}]|[\xe0-\xef][{_CONTINUATION}]{{2}}|[\xf0-\xf4][{_CONTINUATION}]{{3}}"
NONPRINTABLE = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff]"  # controls, replacement, private use
DAMAGE = re.compile(f"{MOJIBAKE}|{NONPRINTABLE}")
MOSTLY = 0.5  # a text whose visible characters are at least this share damaged is unreadable
PRIME = (1 << 32) - 5  # MinHash modulus: a*h + b stays below 2**64 for 32-bit h, a and b, so uint64 is exact
RECALL = 0.99  # LSH banding: chance that a pair exactly at the threshold becomes a candidate
CLIP = 200  # characters of a text kept in an example
SMALL_PER_CLASS = 100  # rows per class below which `afinar check` calls a training set small
IMBALANCE = 10  # largest / smallest class size above which class weights are recommended

log = logging.getLogger(__name__)


def shingles(text: str, n: int) -> set[str]:
    """Character n-grams; a text shorter than n is its own single n-gram."""
    return {text[i:i + n] for i in range(max(1, len(text) - n + 1))}


@dataclass
class Finding:
    """What one check flags in one split: `count` as the table shows it (each `DataReport` field says what is
    counted), `indices` the row numbers a policy acts on, and a few `examples` with their texts."""

    count: int = 0
    indices: list[int] = field(default_factory=list, repr=False)
    examples: list[dict] = field(default_factory=list)
    detail: dict[str, int] = field(default_factory=dict)


@dataclass
class DataReport:
    """The checks' results per split; row numbers are positions in the splits as `run_checks` saw them."""

    rows: dict[str, int]
    empty: dict[str, Finding]  # empty or whitespace-only texts
    mojibake: dict[str, Finding]  # texts with encoding damage or control characters; detail["mostly"]: unreadable
    duplicates: dict[str, Finding]  # rows repeating an earlier normalised text of their split (the first is kept);
    #                                 detail["verbatim"]: the same, comparing texts only stripped of outer spaces
    conflicts: Finding  # train: count = normalised texts with more than one label; indices = all their rows
    balance: dict[str, dict]  # class counts, and the accuracy of always answering train's majority class
    lengths: dict[str, dict] | None  # tokens incl. special tokens: p50, p95, max, truncated (rows > max_length)
    max_length: int | None
    # "train-test" -> {"exact": Finding, "near": Finding}; count: rows of the later split with a match in the
    # earlier one (near excludes exact), indices: the matching rows of the earlier split, exact.detail["verbatim"]
    leakage: dict[str, dict[str, Finding]]
    threshold: float
    actions: list[dict] = field(default_factory=list)  # what `apply_policies` did

    def to_dict(self) -> dict:
        """JSON-ready; without `indices`, which can be as long as the data (examples carry row numbers)."""
        def drop_indices(value):
            if isinstance(value, dict):
                return {k: drop_indices(v) for k, v in value.items() if k != "indices"}
            if isinstance(value, list):
                return [drop_indices(v) for v in value]
            return value

        return drop_indices(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, value: dict) -> DataReport:
        """The inverse of `dataclasses.asdict` (which, unlike `to_dict`, keeps the indices)."""
        per_split = {key: {split: Finding(**f) for split, f in value[key].items()}
                     for key in ("empty", "mojibake", "duplicates")}
        leakage = {pair: {kind: Finding(**f) for kind, f in kinds.items()} for pair, kinds in value["leakage"].items()}
        return cls(**{**value, **per_split, "conflicts": Finding(**value["conflicts"]), "leakage": leakage})


# ---------------------------------------------------------------- per-split checks


def _clip(text: str, limit: int = CLIP) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _example(row: int, text: str, **extra) -> dict:
    return {"row": row, "text": _clip(text), **{k: _clip(v) if isinstance(v, str) else v for k, v in extra.items()}}


def _finding(texts: list[str], indices: list[int], examples: int, **detail: int) -> Finding:
    return Finding(len(indices), indices, [_example(i, texts[i]) for i in indices[:examples]], detail)


def _empty(texts: list[str], examples: int) -> Finding:
    return _finding(texts, [i for i, t in enumerate(texts) if not t.strip()], examples)


def _mojibake(texts: list[str], examples: int) -> Finding:
    """Any damage is counted; `mostly` counts texts where damage dominates (their label is a guess)."""
    flagged, mostly = [], 0
    for i, text in enumerate(texts):
        damaged = sum(len(m) for m in DAMAGE.findall(text))
        if damaged:
            flagged.append(i)
            mostly += damaged / max(1, len("".join(text.split()))) >= MOSTLY
    return _finding(texts, flagged, examples, mostly=mostly)


def _duplicates(texts: list[str], norm: list[str], examples: int) -> Finding:
    """Texts empty after normalisation (only a URL or a mention) are not compared: they share no content."""
    def repeats(keys: list[str]) -> list[int]:
        seen: set[str] = set()
        found = []
        for i, key in enumerate(keys):
            if key in seen:
                found.append(i)
            elif key:
                seen.add(key)
        return found

    return _finding(texts, repeats(norm), examples, verbatim=len(repeats([t.strip() for t in texts])))


def _conflicts(texts: list[str], norm: list[str], labels: list[int], names: list[str], examples: int) -> Finding:
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(norm):
        if key:
            groups.setdefault(key, []).append(i)
    conflicting = [rows for rows in groups.values() if len({labels[i] for i in rows}) > 1]
    return Finding(len(conflicting), sorted(i for rows in conflicting for i in rows),
                   [_example(rows[0], texts[rows[0]], rows=rows[:10],
                             labels={names[k]: int(c) for k, c in enumerate(np.bincount([labels[i] for i in rows]))
                                     if c})
                    for rows in conflicting[:examples]])


def _balance(labels: list[int], names: list[str], majority: int) -> dict:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    return {"counts": {name: int(c) for name, c in zip(names, counts)}, "majority": names[majority],
            "baseline": float(counts[majority] / counts.sum()) if counts.sum() else None}


def _checked_texts(columns: dict) -> list[str]:
    """What the checks read per row: the text, or a sentence pair as one text (a pair with an empty side counts
    as empty), so duplicates and leakage are judged on the pair."""
    if "text_pair" not in columns:
        return columns["text"]
    return [f"{a}\n{b}" if a.strip() and b.strip() else "" for a, b in zip(columns["text"], columns["text_pair"])]


def _lengths(texts: list, tokenizer, max_length: int | None) -> dict:
    """Counted with special tokens, as `data.sources.encode` truncates them (sentence pairs as pairs); percentiles are
    lengths that occur."""
    if texts and isinstance(texts[0], tuple):
        ids = tokenizer([a for a, _ in texts], [b for _, b in texts], verbose=False)["input_ids"]
    else:
        ids = tokenizer(texts, verbose=False)["input_ids"] if texts else []
    lengths = np.array([len(row) for row in ids] or [0])
    return {"p50": int(np.percentile(lengths, 50, method="higher")),
            "p95": int(np.percentile(lengths, 95, method="higher")),
            "max": int(lengths.max()), "truncated": None if max_length is None else int((lengths > max_length).sum())}


# ---------------------------------------------------------------- leakage


def _minhash(texts: list[str], n: int, num_perm: int) -> np.ndarray:
    """MinHash signatures (len(texts) x num_perm) of the texts' n-gram sets, all texts at once.

    Each n-gram is hashed once, as a rolling polynomial over code points in one numpy pass over the joined
    texts (stable across runs, unlike `hash`), then each permutation (a*h + b) % PRIME is one array operation
    and its per-text minimum one `reduceat`."""
    padded = [t.ljust(n, "\0") for t in texts]  # a short text is one n-gram, as in `shingles`
    raw = "".join(padded).encode("utf-32-le", "surrogatepass")
    codes = np.frombuffer(raw, dtype=np.uint32).astype(np.uint64)
    lengths = np.array([len(t) for t in padded])
    windows = lengths - n + 1
    rolling = np.zeros(len(codes) - n + 1, dtype=np.uint64)
    for k in range(n):
        rolling = rolling * np.uint64(1_000_003) + codes[k:len(codes) - n + 1 + k]  # wraps mod 2**64
    firsts = np.cumsum(windows) - windows  # where each text's n-grams start among all n-grams
    starts = np.cumsum(lengths) - lengths  # where each text starts among all characters
    rolling = rolling[np.arange(windows.sum()) - np.repeat(firsts - starts, windows)]  # drop n-grams across texts
    hashes = (rolling ^ (rolling >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, PRIME, num_perm, dtype=np.uint64), rng.integers(0, PRIME, num_perm, dtype=np.uint64)
    signatures = np.empty((len(texts), num_perm), dtype=np.uint64)
    for k in range(num_perm):
        signatures[:, k] = np.minimum.reduceat((a[k] * hashes + b[k]) % np.uint64(PRIME), firsts)
    return signatures


def _rows_per_band(threshold: float, num_perm: int) -> int:
    """The longest bands (fewest chance candidates) that still catch a pair at the threshold with RECALL."""
    fits = [r for r in range(1, num_perm + 1) if 1 - (1 - threshold ** r) ** (num_perm // r) >= RECALL]
    return max(fits, default=1)


def _band_keys(signatures: np.ndarray, rows: int) -> list[np.ndarray]:
    """One 64-bit key per band and text; texts sharing a key in any band are candidates."""
    mix = np.random.default_rng(1).integers(1, 1 << 63, rows, dtype=np.uint64) | np.uint64(1)
    return [(signatures[:, start:start + rows] * mix).sum(axis=1)  # wraps mod 2**64
            for start in range(0, signatures.shape[1] - rows + 1, rows)]


def _candidates(first: np.ndarray, second: np.ndarray, keys: list[np.ndarray]) -> np.ndarray:
    """(earlier id, later id) pairs that share a bucket in some band, as an (n, 2) array.

    Buckets are the runs of equal keys in the sorted keys of `first`; each `second` id finds its run with
    `searchsorted`, so no Python loop runs over the texts."""
    pairs = [np.empty((0, 2), dtype=np.int64)]
    for band in keys:
        order = np.argsort(band[first], kind="stable")
        sorted_keys = band[first][order]
        lo = np.searchsorted(sorted_keys, band[second], "left")
        sizes = np.searchsorted(sorted_keys, band[second], "right") - lo
        hit = sizes > 0
        lo, sizes = lo[hit], sizes[hit]
        within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        pairs.append(np.column_stack([first[order[np.repeat(lo, sizes) + within]], np.repeat(second[hit], sizes)]))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def _leakage(texts: dict[str, list[str]], norm: dict[str, list[str]],
             args: CheckArgs) -> dict[str, dict[str, Finding]]:
    """Every earlier split against every later one, on unique normalised texts (ids) mapped back to rows."""
    ids: dict[str, int] = {}
    uid = {name: [ids.setdefault(t, len(ids)) if t else -1 for t in ts] for name, ts in norm.items()}
    unique = list(ids)
    keys = _band_keys(_minhash(unique, args.ngram, args.num_perm),
                      _rows_per_band(args.near_duplicate_threshold, args.num_perm)) if unique else []
    grams: dict[int, set[str]] = {}

    def jaccard(i: int, j: int) -> float:
        a = grams.setdefault(i, shingles(unique[i], args.ngram))
        b = grams.setdefault(j, shingles(unique[j], args.ngram))
        return len(a & b) / len(a | b)

    result = {}
    for first, second in combinations(norm, 2):
        rows_of: dict[int, list[int]] = {}
        for row, u in enumerate(uid[first]):
            rows_of.setdefault(u, []).append(row)
        later = uid[second]
        shared = set(rows_of) & set(later) - {-1}
        outer = {t.strip() for t in texts[first]} - {""}
        exact = Finding(sum(u in shared for u in later), sorted(r for u in shared for r in rows_of[u]),
                        detail={"verbatim": sum(t.strip() in outer for t in texts[second])})
        best: dict[int, tuple[float, int]] = {}  # later id -> (similarity, earlier id) of its closest match
        near_ids = set()
        candidates = _candidates(np.array(sorted(set(rows_of) - {-1}), dtype=np.int64),
                                 np.array(sorted(set(later) - {-1}), dtype=np.int64), keys)
        for i, j in candidates.tolist():
            score = jaccard(i, j)
            if score >= args.near_duplicate_threshold:
                near_ids.add(i)
                best[j] = max(best.get(j, (0.0, i)), (score, i))
        near = Finding(sum(u in best and u not in shared for u in later),
                        sorted(r for i in near_ids - shared for r in rows_of[i]))
        for row, u in enumerate(later):
            finding, match = (exact, (1.0, u)) if u in shared else (near, best.get(u))
            if match and len(finding.examples) < args.examples:
                first_row = rows_of[match[1]][0]
                finding.examples.append(_example(first_row, texts[first][first_row], other_row=row,
                                                 other_text=texts[second][row], similarity=round(match[0], 3)))
        result[f"{first}-{second}"] = {"exact": exact, "near": near}
    return result


# ---------------------------------------------------------------- the report, and acting on it


def run_checks(splits: Splits, check_args: CheckArgs, tokenizer=None, max_length: int | None = None) -> DataReport:
    """Check every split; `tokenizer` adds the token-length profile (and `max_length` its truncation count)."""
    columns = {name: ds[:] for name, ds in splits.items()}  # whole columns: row-by-row access is slow
    texts = {name: _checked_texts(c) for name, c in columns.items()}
    pairs = {name: list(zip(c["text"], c["text_pair"])) if "text_pair" in c else None for name, c in columns.items()}
    labels = {name: c["label"] for name, c in columns.items()}
    norm = {name: [normalise(t) for t in ts] for name, ts in texts.items()}
    n = check_args.examples
    majority = int(np.argmax(np.bincount(np.asarray(labels["train"], dtype=np.int64),
                                         minlength=len(splits.label_names))))
    return DataReport(
        rows={name: len(ts) for name, ts in texts.items()},
        empty={name: _empty(ts, n) for name, ts in texts.items()},
        mojibake={name: _mojibake(ts, n) for name, ts in texts.items()},
        duplicates={name: _duplicates(ts, norm[name], n) for name, ts in texts.items()},
        conflicts=_conflicts(texts["train"], norm["train"], labels["train"], splits.label_names, n),
        balance={name: _balance(ls, splits.label_names, majority) for name, ls in labels.items()},
        lengths=None if tokenizer is None else {name: _lengths(pairs[name] or ts, tokenizer, max_length)
                                                for name, ts in texts.items()},
        max_length=max_length,
        leakage=_leakage(texts, norm, check_args),
        threshold=check_args.near_duplicate_threshold)


def run_checks_cached(splits: Splits, check_args: CheckArgs, tokenizer, max_length: int | None) -> DataReport:
    """`run_checks`, answered from the on-disk cache when the same texts and labels were checked with the same
    settings and tokenizer before."""
    key = cache.digest("checks", {name: cache.dataset_digest(ds) for name, ds in splits.items()}, splits.label_names,
                       dataclasses.asdict(check_args), tokenizer and cache.tokenizer_digest(tokenizer), max_length)
    value, hit = cache.cached_json("checks", key, lambda: dataclasses.asdict(
        run_checks(splits, check_args, tokenizer, max_length)))
    if hit:
        log.info("data checks: from the cache (same texts, labels, settings and tokenizer)")
    return DataReport.from_dict(value)


def checked_splits(config: Config, tokenizer, with_test: bool = True) -> tuple[Splits, DataReport]:
    """What training sees: the data read, checked, with the `checks.on_*` policies applied, validation carved
    and the seeded subsets taken; plus the report of the checks."""
    raw = read_splits(config.data, with_test)
    report = run_checks_cached(raw, config.checks, tokenizer, config.data.max_length)
    return prepare_splits(apply_policies(raw, report, config.checks), config.data, config.train.seed), report


def checked_documents(config: Config, with_test: bool = True) -> tuple[TextSplits, DataReport]:
    """What causal-LM training sees: the documents read, checked as rows of one class (empty, damaged, duplicated,
    leaked exactly or nearly into validation/test), the `checks.on_*` policies applied to train, validation carved
    and the seeded subsets taken; plus the report of the checks."""
    raw = read_text_splits(config.data, with_test)
    rows = raw.as_rows()
    report = run_checks_cached(rows, config.checks, None, None)
    checked = apply_policies(rows, report, config.checks)
    kept = dataclasses.replace(raw, train=list(checked.train["text"]), notes=checked.notes)
    return prepare_texts(kept, config.data, config.train.seed), report


def apply_policies(splits: Splits, report: DataReport, check_args: CheckArgs,
                   duplicates_are: str = "after normalisation") -> Splits:
    """New splits with the `checks.on_*` policies applied; the input splits and files are left as they are.

    Only train rows are ever dropped: held-out rows (empty, duplicated, or overlapping each other) are reported
    but kept, because a validation or test set that each run edits differently gives scores that cannot be
    compared with other runs or published results. Leakage is resolved on the train side for the same reason.
    Policies apply in the order empty, conflicts (all rows of the text: no label can be trusted), duplicates
    (the first kept), leakage; a row is counted by the first policy that drops it. `error` raises for anything
    `drop` would have dropped, naming every such finding, before anything changes. Each action is a note in
    the returned `Splits.notes` and an entry in `report.actions`; `duplicates_are` says in it what made rows
    duplicates (a task that replaced `report.duplicates` with its own rule names that rule).
    """
    if report.rows.get("train") != len(splits.train):
        raise AfinarError(f"the data report is for {report.rows.get('train')} train rows, the splits have "
                          f"{len(splits.train)}; run the checks on these splits")
    findings = [("on_empty", report.empty["train"].indices, "empty or whitespace-only train rows"),
                ("on_conflicts", report.conflicts.indices,
                 f"train rows of {report.conflicts.count} texts with conflicting labels"),
                ("on_duplicates", report.duplicates["train"].indices,
                 f"train rows repeating an earlier train text ({duplicates_are})")]
    for pair, found in report.leakage.items():
        first, second = pair.split("-")
        if first == "train":
            findings += [("on_leakage", found["exact"].indices, f"train rows that also occur in {second} (exact)"),
                         ("on_leakage", found["near"].indices, f"train rows that are near-duplicates of {second} "
                                                               f"rows (Jaccard >= {report.threshold})")]
    findings = [(key, indices, what) for key, indices, what in findings if indices]
    errors = [(key, f"{len(indices)} {what} (checks.{key})") for key, indices, what in findings
              if getattr(check_args, key) == "error"]
    if errors:
        raise AfinarError(f"data checks failed: {'; '.join(text for _, text in errors)}; set the named key to "
                          f"drop or warn (e.g. --set checks.{errors[0][0]}=drop)")
    dropped: set[int] = set()
    notes = []
    for key, indices, what in findings:
        if getattr(check_args, key) == "drop":
            new = sorted(set(indices) - dropped)
            dropped.update(new)
            already = len(indices) - len(new)
            note = f"dropped {len(new)} {what}" + (f" ({already} more already dropped above)" if already else "")
            report.actions.append({"check": key, "action": "drop", "split": "train", "rows": new, "note": note})
        else:
            note = f"kept {len(indices)} {what} (checks.{key}=warn)"
            report.actions.append({"check": key, "action": "warn", "split": "train", "rows": [], "note": note})
        notes.append(note)
    train = splits.train
    if dropped:
        train = select_rows(train, [i for i in range(len(train)) if i not in dropped])
    return dataclasses.replace(splits, train=train, notes=[*splits.notes, *notes])


def format_report(report: DataReport, examples: int = 2) -> str:
    """A plain-text table, one column per split, then a few examples per finding and the actions taken."""
    names = list(report.rows)

    def per_split(show) -> list[str]:
        return [show(s) for s in names]

    table: list[tuple[str, list[str]]] = [
        ("rows", per_split(lambda s: f"{report.rows[s]:,}")),
        ("empty texts", per_split(lambda s: f"{report.empty[s].count:,}")),
        ("mojibake / control chars", per_split(lambda s: f"{report.mojibake[s].count:,}")),
        ("duplicates (verbatim)", per_split(lambda s: f"{report.duplicates[s].detail['verbatim']:,}")),
        ("duplicates (normalised)", per_split(lambda s: f"{report.duplicates[s].count:,}")),
        ("conflicting labels (texts)", per_split(lambda s: f"{report.conflicts.count:,}" if s == "train" else "")),
        ("majority-class baseline", per_split(lambda s: "" if report.balance[s]["baseline"] is None
                                              else f"{report.balance[s]['baseline']:.1%}")),
    ]
    if report.lengths is not None:
        table.append(("tokens p50/p95/max", per_split(
            lambda s: "{p50}/{p95}/{max}".format(**report.lengths[s]) if report.rows[s] else "")))
        if report.max_length is not None:
            table.append((f"truncated at {report.max_length} tokens",
                          per_split(lambda s: f"{report.lengths[s]['truncated']:,}")))
    for first in names[:-1]:
        leaks = {s: report.leakage[f"{first}-{s}"] for s in names if f"{first}-{s}" in report.leakage}
        table += [(f"also in {first}: exact (verbatim)", per_split(
                      lambda s: f"{leaks[s]['exact'].count:,} ({leaks[s]['exact'].detail['verbatim']:,})"
                      if s in leaks else "")),
                  (f"also in {first}: near >= {report.threshold}",
                   per_split(lambda s: f"{leaks[s]['near'].count:,}" if s in leaks else ""))]
    width = max(len(label) for label, _ in table)
    widths = [max(len(s), *(len(cells[i]) for _, cells in table)) for i, s in enumerate(names)]
    lines = [" " * width + "".join(f"  {s:>{w}}" for s, w in zip(names, widths))]
    lines += [(label.ljust(width) + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths))).rstrip()
              for label, cells in table]

    def quote(text: str) -> str:
        return repr(_clip(text, 60))

    shown = [f"  {check} in {s} row {e['row']}: {quote(e['text'])}"
             for check, found in (("empty", report.empty), ("mojibake", report.mojibake),
                                  ("duplicate", report.duplicates)) for s, f in found.items()
             for e in f.examples[:examples]]
    shown += [f"  conflict in train rows {', '.join(map(str, e['rows']))}: {quote(e['text'])} "
              f"labelled {', '.join(f'{k} x{c}' for k, c in e['labels'].items())}"
              for e in report.conflicts.examples[:examples]]
    shown += [f"  {kind} leak: {pair.split('-')[1]} row {e['other_row']} {quote(e['other_text'])} ~ "
              f"{pair.split('-')[0]} row {e['row']} {quote(e['text'])}"
              + (f" (Jaccard {e['similarity']})" if kind == "near" else "")
              for pair, kinds in report.leakage.items() for kind, f in kinds.items() for e in f.examples[:examples]]
    if shown:
        lines += ["", "examples:", *shown]
    if report.actions:
        lines += ["", "actions:", *(f"  {a['note']}" for a in report.actions)]
    lines += [line for advice in (small_data_advice(report), imbalance_advice(report)) if advice
              for line in ("", advice)]
    return "\n".join(lines)


def imbalance_advice(report: DataReport) -> str | None:
    """A recommendation when train's smallest class has under a tenth of its largest's rows, or None."""
    counts = report.balance.get("train", {}).get("counts", {})
    if len(counts) < 2 or min(counts.values()) * IMBALANCE >= max(counts.values()):
        return None
    small, large = min(counts, key=counts.get), max(counts, key=counts.get)
    return (f"imbalanced classes: {small!r} has {counts[small]:,} training rows, {large!r} {counts[large]:,}; "
            f"accuracy rewards ignoring the small class: train with --set train.class_weights=balanced and pick "
            f"the best checkpoint by --set train.metric_for_best_model=macro_f1")


def small_data_advice(report: DataReport, min_steps: int = TrainArgs.min_steps) -> str | None:
    """What afinar does about a training set with fewer than `SMALL_PER_CLASS` rows per class, or None."""
    counts = report.balance.get("train", {}).get("counts", {})
    if not counts or report.rows["train"] >= SMALL_PER_CLASS * len(counts):
        return None
    return (f"small training set: {report.rows['train']:,} rows for {len(counts)} classes (smallest class "
            f"{min(counts.values()):,}). With train.epochs, train.learning_rate and train.eval_every unset, afinar "
            f"trains for at least train.min_steps ({min_steps}) optimizer steps, evaluates 8 times and gives LoRA an "
            f"adapter learning rate; `afinar compare CONFIG --strategies setfit,linear_probe,few_shot,full` weighs "
            f"few-shot fine-tuning against the rest, and `afinar curve CONFIG` shows what more labels would add.")


def check(config: Config) -> DataReport:
    """`afinar check`: the report for the configured data as its source splits it, with the actions training
    will take (`report.actions`); raises where a policy is `error`. No file is changed."""
    splits = read_splits(config.data)
    report = run_checks(splits, config.checks, load_tokenizer(config.model), config.data.max_length)
    apply_policies(splits, report, config.checks)
    return report
