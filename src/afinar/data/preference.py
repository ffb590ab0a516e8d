"""Preference pairs for preference tuning: a prompt (a conversation) and two answers to it, the chosen one
preferred; read from any format afinar reads, checked, split by conversation and tokenized.

Formats, detected by column:
- `prompt` + `chosen` + `rejected`: the prompt a string (one user message) or a message list; each answer a
  string or a one-message list holding the assistant's answer (TRL's explicit-prompt format);
- `chosen` + `rejected` as message lists sharing every message but their last, the assistant's answers (TRL's
  implicit prompt);
- `chosen` + `rejected` as Anthropic HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."): each is split at
  its last "\\n\\nAssistant:" into the conversation before it and the answer after it, and the two conversations
  must be the same text.

A pair that is not two answers to one conversation (the prefixes differ) is refused: left out of every split and
named by its row. So are pairs that cannot express a preference: an empty answer, or two identical answers. The
rest are checked as rows whose text is the prompt (`data.checks`: empty, damaged, near-duplicate prompts leaking
between splits; duplicates are the same prompt with the same two answers), split by conversation (pairs that share
a prompt stay in one split) and tokenized through the chat template with the prompt cut from the left to fit
`data.max_length`; a pair whose answers cannot fit even then is dropped and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from datasets import Dataset

from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.data import chat
from afinar.data.checks import DataReport, Finding, apply_policies, format_report, run_checks_cached
from afinar.data.sources import (
    Splits,
    carve_rows,
    cell_list,
    normalise,
    split_frames,
    subset_rows,
)

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"(\n\nHuman:|\n\nAssistant:)")
CLIP = 200


@dataclass
class Pair:
    prompt: chat.Messages  # the conversation the two answers reply to
    chosen: str
    rejected: str
    row: int  # in its file (0-based, header excluded)


# ---------------------------------------------------------------- formats


def split_transcript(text: str) -> tuple[chat.Messages, str] | None:
    """An HH-RLHF transcript as the conversation before its last "\\n\\nAssistant:" and the answer after it (each
    turn's text stripped of the spaces around it); None when it has no assistant turn or does not open with
    "\\n\\nHuman:"."""
    cut = text.rfind(ASSISTANT)
    if cut < 0 or not text.startswith(HUMAN):
        return None
    pieces = _TURN.split(text[:cut])[1:]  # [marker, text, marker, text, ...]
    prompt = [{"role": "user" if marker == HUMAN else "assistant", "content": content.strip()}
              for marker, content in zip(pieces[::2], pieces[1::2])]
    return prompt, text[cut + len(ASSISTANT):].strip()


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _messages(value, where: str, column: str) -> chat.Messages:
    messages = cell_list(value, where, column)
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in chat.ROLES or \
                not isinstance(message.get("content"), str):
            raise AfinarError(f"{where}: each message of {column!r} needs a role ({', '.join(chat.ROLES)}) and text "
                              f"content (got {str(message)[:80]})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _answer(value, where: str, column: str) -> str:
    """A string, or a list holding one assistant message (a list given as JSON text in CSV)."""
    text = _text(value)
    if isinstance(value, (list, tuple, np.ndarray)) or text.lstrip().startswith("[{"):
        messages = _messages(value, where, column)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise AfinarError(f"{where}: {column!r} must be the answer, a string or one assistant message "
                              f"(got {len(messages)} messages)")
        return messages[0]["content"]
    return text


def detect_format(columns: list[str]) -> str:
    lower = {c.lower() for c in columns}
    if {"chosen", "rejected"} <= lower:
        return "prompt_chosen_rejected" if "prompt" in lower else "chosen_rejected"
    return "unknown"


def read_pairs(frame: pd.DataFrame, where: str) -> tuple[list[Pair], list[dict], str]:
    """The pairs of one file, the refused rows ({row, reason}) and the format found."""
    columns = {str(c).lower(): c for c in frame.columns}
    kind = detect_format(list(columns))
    if kind == "unknown":
        raise AfinarError(f"{where}: no preference columns (columns seen: {', '.join(map(str, frame.columns))}); give "
                          f"prompt + chosen + rejected, or chosen + rejected (message lists or HH-RLHF transcripts)")
    pairs, refused = [], []
    records = frame.to_dict("records")
    transcripts = kind == "chosen_rejected" and isinstance(records[0][columns["chosen"]], str) and \
        not records[0][columns["chosen"]].lstrip().startswith("[")
    if transcripts:
        kind = "hh_transcripts"
    for number, row in enumerate(records):
        here = f"{where} row {number}"
        chosen, rejected = row[columns["chosen"]], row[columns["rejected"]]
        if kind == "prompt_chosen_rejected":
            value = row[columns["prompt"]]
            plain = not isinstance(value, (list, tuple, np.ndarray)) and not _text(value).lstrip().startswith("[{")
            prompt = [{"role": "user", "content": _text(value)}] if plain else _messages(value, here, "prompt")
            pairs.append(Pair(prompt, _answer(chosen, here, "chosen"), _answer(rejected, here, "rejected"), number))
        elif transcripts:
            first, second = split_transcript(_text(chosen)), split_transcript(_text(rejected))
            if first is None or second is None:
                refused.append({"row": number, "reason": "not an HH transcript (it must open with '\\n\\nHuman:' and "
                                                          "have an '\\n\\nAssistant:' turn)"})
            elif _text(chosen)[:_text(chosen).rfind(ASSISTANT)] != _text(rejected)[:_text(rejected).rfind(ASSISTANT)]:
                refused.append({"row": number, "reason": "chosen and rejected differ before their last "
                                                          "'\\n\\nAssistant:', so they are not two answers to one "
                                                          "conversation"})
            else:
                pairs.append(Pair(first[0], first[1], second[1], number))
        else:
            first, second = _messages(chosen, here, "chosen"), _messages(rejected, here, "rejected")
            if not first or not second or first[-1]["role"] != "assistant" or second[-1]["role"] != "assistant":
                raise AfinarError(f"{here}: chosen and rejected must each end with the assistant's answer")
            if first[:-1] != second[:-1]:
                refused.append({"row": number, "reason": "chosen and rejected differ before their last message, "
                                                          "so they are not two answers to one conversation"})
            else:
                pairs.append(Pair(first[:-1], first[-1]["content"], second[-1]["content"], number))
    return pairs, refused, kind


def without_preference(pairs: list[Pair]) -> tuple[list[Pair], list[dict]]:
    """The pairs that can express a preference, and the others ({row, reason}): an empty answer, or two answers
    that are the same text (spaces around them aside)."""
    kept, refused = [], []
    for pair in pairs:
        if not pair.chosen.strip() or not pair.rejected.strip():
            refused.append({"row": pair.row, "reason": "empty answer"})
        elif pair.chosen.strip() == pair.rejected.strip():
            refused.append({"row": pair.row, "reason": "identical answers"})
        else:
            kept.append(pair)
    return kept, refused


def conversation_key(pair: Pair) -> str:
    """What makes two pairs one conversation: their normalised prompt (`sources.normalise`)."""
    return normalise(chat.prompt_text(pair.prompt))


def carve_conversations(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """`pairs` split into kept and held out (a seeded `fraction` of the conversations, `sources.carve_rows`), all
    pairs of one conversation on the same side."""
    keys = [conversation_key(p) for p in pairs]
    groups = {key: index for index, key in enumerate(dict.fromkeys(keys))}
    _, held, _ = carve_rows(len(groups), fraction, seed)
    held = set(held)
    return ([p for p, k in zip(pairs, keys) if groups[k] not in held],
            [p for p, k in zip(pairs, keys) if groups[k] in held])


# ---------------------------------------------------------------- tokens


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    cut: bool  # the prompt was cut from the left to fit


def encode_pair(tokenizer, pair: Pair, max_length: int) -> EncodedPair | None:
    """The prompt through the chat template with its generation prompt, and each answer's turn
    (`chat.answer_ids`); the prompt cut from the left (`chat.fit_prompt_left`) when prompt and the longer answer
    exceed `max_length`, never the answers: None when they cannot fit."""
    before = chat.render_ids(tokenizer, pair.prompt, generation_prompt=True)
    chosen = chat.answer_ids(tokenizer, pair.prompt, pair.chosen, before)
    rejected = chat.answer_ids(tokenizer, pair.prompt, pair.rejected, before)
    longest = max(len(chosen), len(rejected))
    if len(before) + longest <= max_length:
        return EncodedPair(before, chosen, rejected, False)
    fitted = chat.fit_prompt_left(tokenizer, pair.prompt, max_length - longest) if longest < max_length else None
    if fitted is None:
        return None
    before = chat.render_ids(tokenizer, fitted, generation_prompt=True)
    chosen = chat.answer_ids(tokenizer, fitted, pair.chosen, before)
    rejected = chat.answer_ids(tokenizer, fitted, pair.rejected, before)
    if len(before) + max(len(chosen), len(rejected)) > max_length:
        return None
    return EncodedPair(before, chosen, rejected, True)


def encode_split(tokenizer, pairs: list[Pair], max_length: int, name: str) -> tuple[Dataset, list[Pair], dict]:
    """Token columns for TRL's `DataCollatorForPreference` (`prompt_ids`, `chosen_ids`, `rejected_ids`, and
    `length`, the longer sequence, for length-grouped batches), the pairs kept, in the same order, and the counts."""
    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "length": []}
    kept, cut = [], 0
    for pair in pairs:
        encoded = encode_pair(tokenizer, pair, max_length)
        if encoded is None:
            continue
        kept.append(pair)
        cut += encoded.cut
        columns["prompt_ids"].append(encoded.prompt_ids)
        columns["chosen_ids"].append(encoded.chosen_ids)
        columns["rejected_ids"].append(encoded.rejected_ids)
        columns["length"].append(len(encoded.prompt_ids) + max(len(encoded.chosen_ids), len(encoded.rejected_ids)))
    lengths = np.array(columns["length"] or [0])
    stats = {"pairs": len(pairs), "kept": len(kept), "dropped_answers_too_long": len(pairs) - len(kept),
             "prompts_cut": cut, "tokens_p50": int(np.percentile(lengths, 50)),
             "tokens_p95": int(np.percentile(lengths, 95)), "tokens_max": int(lengths.max())}
    if not kept:
        raise AfinarError(f"{name}: no pair's answers fit data.max_length={max_length} tokens; raise it")
    return Dataset.from_dict(columns), kept, stats


# ---------------------------------------------------------------- read, check, split, tokenize


@dataclass
class CheckedPairs:
    """What preference tuning trains on, and what `afinar check` shows of it."""

    pairs: dict[str, list[Pair]]  # per split: checked, carved, subset and fitting pairs, in dataset order
    datasets: dict[str, Dataset]  # per split: token columns (`encode_split`)
    report: DataReport  # the row checks, on the prompts
    kind: str  # the format the data came in
    sources: dict[str, str]
    fingerprints: dict[str, str]
    refused: dict[str, list[dict]]  # per split: {row, reason} of each pair left out before the checks
    stats: dict[str, dict]  # per split: pairs, dropped (answers too long), prompts cut, token lengths
    notes: list[str] = field(default_factory=list)

    def report_dict(self) -> dict:
        return {**self.report.to_dict(), "preference": {
            "format": self.kind, "refused": {name: {"count": len(rows), "rows": rows[:50]}
                                             for name, rows in self.refused.items()}, "tokens": self.stats}}


def _duplicate_pairs(pairs: list[Pair], examples: int) -> Finding:
    """Pairs repeating an earlier one: the same normalised prompt with the same two answers. Another pair of
    answers to the same prompt is not a duplicate: preference data often holds several per conversation."""
    seen: set[tuple] = set()
    rows = []
    for index, pair in enumerate(pairs):
        key = (conversation_key(pair), normalise(pair.chosen), normalise(pair.rejected))
        if key in seen:
            rows.append(index)
        seen.add(key)
    return Finding(len(rows), rows, [{"row": i, "text": chat.prompt_text(pairs[i].prompt)[:CLIP]}
                                     for i in rows[:examples]], {"verbatim": len(rows)})


def _read(config: Config, with_test: bool) -> tuple[dict[str, list[Pair]], dict[str, list[dict]], str, dict, dict]:
    args = config.data
    frames, sources, fingerprints = split_frames(args, with_test)
    pairs, refused, kinds = {}, {}, set()
    for name, frame in frames.items():
        found, refused[name], kind = read_pairs(frame, sources[name])
        pairs[name], empty = without_preference(found)
        refused[name] += empty
        kinds.add(kind)
        if not pairs[name]:
            raise AfinarError(f"{sources[name]}: no usable pair ({len(refused[name])} refused, e.g. row "
                              f"{refused[name][0]['row']}: {refused[name][0]['reason']})")
    return pairs, refused, "+".join(sorted(kinds)), sources, fingerprints


def _as_rows(pairs: dict[str, list[Pair]]) -> Splits:
    """The pairs as the row checks read them: the prompt is the text, every row one class."""
    datasets = {name: Dataset.from_dict({"text": [chat.prompt_text(p.prompt) for p in ps], "label": [0] * len(ps)})
                for name, ps in pairs.items()}
    return Splits(datasets["train"], datasets.get("validation"), datasets.get("test"), ["pair"])


def checked_pairs(config: Config, tokenizer, with_test: bool = True) -> CheckedPairs:
    """Read the pairs and refuse those that are not pairs, carve test (`preference.test_fraction`, when the data
    has no test split and `with_test`) and validation (`data.validation_fraction`) by conversation, check the
    prompts (the `checks.on_*` policies act on train), take the seeded subsets and tokenize."""
    pairs, refused, kind, sources, fingerprints = _read(config, with_test)
    notes = [f"{name}: refused {len(rows):,} pairs (" + ", ".join(
        f"{reason}: rows {', '.join(str(r['row']) for r in rows if r['reason'] == reason)}"
        for reason in dict.fromkeys(r["reason"] for r in rows)) + ")" for name, rows in refused.items() if rows]
    seed, data = config.train.seed, config.data
    for name, fraction in (("test", config.preference.test_fraction), ("validation", data.validation_fraction)):
        if name not in pairs and (name != "test" or with_test):
            pairs["train"], pairs[name] = carve_conversations(pairs["train"], fraction, seed)
            sources[name] = f"{sources['train']} (carved)"
            notes.append(f"{name} carved from train: {len(pairs[name]):,} pairs ({fraction:.0%} of the conversations, "
                         f"seed {seed}; the pairs of one conversation stay together)")
    pairs = {name: pairs[name] for name in ("train", "validation", "test") if name in pairs}
    rows = _as_rows(pairs)
    report = run_checks_cached(rows, config.checks, None, None)
    for name, ps in pairs.items():
        report.duplicates[name] = _duplicate_pairs(ps, config.checks.examples)
    checked = apply_policies(rows, report, config.checks, "the same prompt with the same two answers")
    notes += checked.notes
    dropped = {row for action in report.actions if action["action"] == "drop" for row in action["rows"]}
    pairs["train"] = [p for i, p in enumerate(pairs["train"]) if i not in dropped]
    limits = {"train": data.max_train_samples, "validation": data.max_eval_samples, "test": data.max_test_samples}
    for name, ps in pairs.items():
        subset = subset_rows(len(ps), limits[name], seed)
        if subset is not None:
            pairs[name] = [ps[i] for i in subset]
            notes.append(f"{name}: seeded subset of {len(subset):,} of {len(ps):,} pairs")
    datasets, stats = {}, {}
    for name, ps in pairs.items():
        datasets[name], pairs[name], stats[name] = encode_split(tokenizer, ps, data.max_length, name)
        if name != "train":  # held-out pairs longest first: evaluation batches pad little (their order is free)
            order = np.argsort(-np.asarray(datasets[name]["length"]), kind="stable").tolist()
            datasets[name], pairs[name] = datasets[name].select(order), [pairs[name][i] for i in order]
        s = stats[name]
        if s["prompts_cut"] or s["dropped_answers_too_long"]:
            notes.append(f"{name}: {s['prompts_cut']:,} prompts cut from the left to fit data.max_length="
                         f"{data.max_length}; {s['dropped_answers_too_long']:,} pairs dropped, their answers alone "
                         f"too long for it")
    return CheckedPairs(pairs, datasets, report, kind, sources, fingerprints, refused, stats, notes)


def format_checked(checked: CheckedPairs) -> str:
    """The refused pairs, the checks' table (on the prompts) and the token profile per split, as text."""
    lines = [f"preference pairs ({checked.kind}):"]
    for name, rows in checked.refused.items():
        for reason in dict.fromkeys(r["reason"] for r in rows):
            numbers = [r["row"] for r in rows if r["reason"] == reason]
            lines.append(f"  {name}: refused {len(numbers):,} ({reason}): rows {', '.join(map(str, numbers[:20]))}"
                         + (" ..." if len(numbers) > 20 else ""))
    lines += ["", "data checks (on the prompts; duplicates: the same prompt with the same two answers):",
              format_report(checked.report), "", "tokens per pair (prompt + the longer answer, chat template applied):"]
    for name, s in checked.stats.items():
        lines.append(f"  {name}: {s['kept']:,} pairs; p50 {s['tokens_p50']}, p95 {s['tokens_p95']}, max "
                     f"{s['tokens_max']}; prompts cut from the left {s['prompts_cut']:,}, pairs dropped (answers too "
                     f"long) {s['dropped_answers_too_long']:,}")
    return "\n".join(lines)
