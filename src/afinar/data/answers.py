"""Questions over contexts for extractive question answering: reading them (SQuAD JSON, flat CSV / JSONL /
Parquet with `question`, `context`, `answers`, hub datasets in SQuAD's columns), checking each answer against
its context, and cutting question + context into model windows.

An answer whose `answer_start` does not point at its text in the context is an error naming the question's id:
a model trained on it would learn the wrong span, and a score against it would be wrong. A context longer than
`qa.max_seq_length` sub-tokens is cut into windows that overlap by `qa.doc_stride` sub-tokens (`transformers`' overflow
with offsets); a window that does not hold the whole answer is labelled with the first token (no answer here),
and at prediction the best span over all windows of a question wins (`best_span`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from afinar.core.config import DataArgs, QAArgs
from afinar.core.errors import AfinarError
from afinar.data.sources import (
    existing,
    hub_datasets,
    hub_fingerprint,
    read_table,
    read_text_file,
    sha256_file,
    split_files,
)


@dataclass
class Question:
    id: str
    question: str
    context: str
    answers: list[str]  # every gold answer text (SQuAD's test questions have several)
    starts: list[int]  # their character offsets into the context


@dataclass
class QASplits:
    train: list[Question]
    validation: list[Question] | None
    test: list[Question] | None
    sources: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def items(self) -> list[tuple[str, list[Question]]]:
        return [(name, q) for name, q in (("train", self.train), ("validation", self.validation),
                                          ("test", self.test)) if q is not None]


def _checked(question: Question, where: str) -> Question:
    if not question.answers:
        raise AfinarError(f"{where}: question {question.id!r} has no answer; extractive QA trains and scores "
                          f"answers found in the context")
    for text, start in zip(question.answers, question.starts):
        if question.context[start:start + len(text)] != text:
            found = question.context.find(text)
            raise AfinarError(f"{where}: question {question.id!r}: answer {text[:60]!r} is not at answer_start "
                              f"{start} of its context (the context there reads "
                              f"{question.context[start:start + len(text)][:60]!r}"
                              + (f"; it occurs at {found}" if found >= 0 else "; it does not occur in the context")
                              + "); fix answer_start")
    return question


def squad_questions(data: dict, where: str) -> list[Question]:
    """SQuAD JSON: data -> paragraphs -> context, qas -> id, question, answers [{text, answer_start}]."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise AfinarError(f"{where}: not SQuAD JSON (expected a top-level 'data' list of articles)")
    questions = []
    for number, article in enumerate(data["data"]):
        for paragraph in (article.get("paragraphs", []) if isinstance(article, dict) else [None]):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise AfinarError(f"{where}: article {number}: each paragraph needs a context text and its qas "
                                  f"(got {str(paragraph)[:80]})")
            for qa in paragraph.get("qas", []):
                try:
                    answers = qa.get("answers") or []
                    question = Question(str(qa["id"]), str(qa["question"]), paragraph["context"],
                                        [str(a["text"]) for a in answers], [int(a["answer_start"]) for a in answers])
                except (AttributeError, KeyError, TypeError, ValueError):
                    raise AfinarError(f"{where}: article {number}: a question needs id, question and answers "
                                      f"[{{text, answer_start (a number)}}] (got {str(qa)[:120]})") from None
                questions.append(_checked(question, where))
    return questions


def _answers_cell(value, where: str) -> tuple[list[str], list[int]]:
    """`answers` as SQuAD's hub columns ({text: [...], answer_start: [...]}) or a list of {text, answer_start}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise AfinarError(f"{where}: answers must be JSON ({{'text': [...], 'answer_start': [...]}})") from None
    if isinstance(value, dict):
        texts, starts = list(value.get("text", [])), list(value.get("answer_start", []))
    elif isinstance(value, (list, np.ndarray)) and all(isinstance(a, dict) for a in value):
        texts = [a.get("text") for a in value]
        starts = [a.get("answer_start") for a in value]
    else:
        raise AfinarError(f"{where}: answers must be {{'text': [...], 'answer_start': [...]}} (got "
                          f"{type(value).__name__})")
    if len(texts) != len(starts):
        raise AfinarError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    try:
        return [str(t) for t in texts], [int(s) for s in starts]
    except (TypeError, ValueError):
        raise AfinarError(f"{where}: each answer needs a text and a numeric answer_start (got {str(value)[:120]})") \
            from None


def frame_questions(frame: pd.DataFrame, where: str) -> list[Question]:
    missing = [c for c in ("question", "context", "answers") if c not in frame.columns]
    if missing:
        raise AfinarError(f"{where}: no {', '.join(missing)} column (columns: {', '.join(map(str, frame.columns))}); "
                          f"give question, context and answers ({{'text': [...], 'answer_start': [...]}})")
    questions = []
    for number, row in enumerate(frame.to_dict("records")):
        here = f"{where} row {number}"
        texts, starts = _answers_cell(row["answers"], here)
        qid = str(row.get("id", number))
        questions.append(_checked(Question(qid, str(row["question"]), str(row["context"]), texts, starts), here))
    return questions


def read_questions_file(path: Path, args: DataArgs) -> list[Question]:
    if path.suffix.lower() == ".json":
        text = read_text_file(path, args.encoding)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AfinarError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "data" in data:
            return squad_questions(data, str(path))
    return frame_questions(read_table(path, args.encoding), str(path))


def read_question_splits(args: DataArgs, with_test: bool = True) -> QASplits:
    files = split_files(args, with_test, (".json", ".jsonl", ".csv", ".tsv", ".parquet"))
    if files is None:
        return _hub_questions(args, with_test)
    questions = {split: read_questions_file(path, args) for split, path in existing(files).items()}
    return QASplits(questions["train"], questions.get("validation"), questions.get("test"),
                    {s: str(p) for s, p in files.items()}, {s: sha256_file(p) for s, p in files.items()})


def _hub_questions(args: DataArgs, with_test: bool) -> QASplits:
    questions, sources, fingerprints = {}, {}, {}
    for name, ds in hub_datasets(args.source, with_test).items():
        questions[name] = frame_questions(ds.to_pandas(), f"hub:{args.source} {name}")
        sources[name], fingerprints[name] = f"hub:{args.source}", hub_fingerprint(args.source, ds)
    return QASplits(questions["train"], questions.get("validation"), questions.get("test"), sources, fingerprints)


# ---------------------------------------------------------------- windows


@dataclass
class Features:
    """Model windows of a list of questions: `encodings` for `Trainer` (with start/end positions), and per window
    the question it belongs to and each token's character offsets into the context (None outside it)."""

    encodings: dict[str, list]
    question: list[int]
    offsets: list[list[tuple[int, int] | None]]

    def __len__(self) -> int:
        return len(self.question)


def encode_questions(tokenizer, questions: list[str], contexts: list[str], args: QAArgs,
                     answers: list[tuple[int, int]] | None = None) -> Features:
    """Question + context windows (`only_second` truncation with overflow and stride); with `answers` (the first
    gold answer's character start and end per question), start/end token positions: the answer's tokens when the
    window holds it whole, the first token otherwise."""
    if not getattr(tokenizer, "is_fast", False):
        raise AfinarError("question answering maps answers to tokens through character offsets, which needs a fast "
                          "tokenizer (tokenizer.json); this model's has none")
    if not questions:
        return Features({"input_ids": []}, [], [])
    room = args.max_seq_length - tokenizer.num_special_tokens_to_add(pair=True) - args.doc_stride
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    longest = int(np.argmax(lengths))
    if lengths[longest] >= room:
        raise AfinarError(f"question {longest} ({lengths[longest]} sub-tokens: {questions[longest][:60]!r}) leaves "
                          f"no room for its context in qa.max_seq_length={args.max_seq_length} with qa.doc_stride={args.doc_stride}; "
                          f"raise qa.max_seq_length or lower qa.doc_stride")
    batch = tokenizer(questions, contexts, truncation="only_second", max_length=args.max_seq_length, stride=args.doc_stride,
                      return_overflowing_tokens=True, return_offsets_mapping=True)
    owners = batch.pop("overflow_to_sample_mapping")
    offsets_all = batch.pop("offset_mapping")
    offsets, starts, ends = [], [], []
    for row, owner in enumerate(owners):
        sequence = batch.sequence_ids(row)
        offsets.append([tuple(o) if s == 1 else None for o, s in zip(offsets_all[row], sequence)])
        if answers is None:
            continue
        first, last = answers[owner]
        inside = [i for i, o in enumerate(offsets[-1]) if o is not None]
        if not inside or offsets[-1][inside[0]][0] > first or offsets[-1][inside[-1]][1] < last:
            starts.append(0)
            ends.append(0)
            continue
        starts.append(next(i for i in inside if offsets[-1][i][1] > first))
        ends.append(max(i for i in inside if offsets[-1][i][0] < last))
    encodings = {key: list(values) for key, values in batch.items()}
    if answers is not None:
        encodings["start_positions"], encodings["end_positions"] = starts, ends
    return Features(encodings, list(owners), offsets)


def best_spans(features: Features, start_logits: np.ndarray, end_logits: np.ndarray, contexts: list[str],
               args: QAArgs) -> list[tuple[int, int, float]]:
    """Per question, the best (character start, end, probability) over all its windows: the `qa.best_spans`
    highest start and end logits of each window, pairs inside the context with end >= start and at most
    `qa.max_answer_tokens` tokens, ranked by start + end logit; the probability is the window's softmax of the
    start times that of the end. A question whose windows admit no span gets (0, 0, 0.0)."""
    best: list[tuple[float, int, int, float]] = [(-np.inf, 0, 0, 0.0)] * len(contexts)
    for row, owner in enumerate(features.question):
        offsets = features.offsets[row]
        n = len(offsets)
        starts, ends = start_logits[row][:n], end_logits[row][:n]
        p_start = np.exp(starts - starts.max()) / np.exp(starts - starts.max()).sum()
        p_end = np.exp(ends - ends.max()) / np.exp(ends - ends.max()).sum()
        for i in np.argsort(starts)[::-1][:args.best_spans]:
            if offsets[i] is None:
                continue
            for j in np.argsort(ends)[::-1][:args.best_spans]:
                if offsets[j] is None or j < i or j - i + 1 > args.max_answer_tokens:
                    continue
                score = float(starts[i] + ends[j])
                if score > best[owner][0]:
                    best[owner] = (score, offsets[i][0], offsets[j][1], float(p_start[i] * p_end[j]))
    return [(start, end, probability) for _, start, end, probability in best]
