"""Extractive question answering: SQuAD JSON and flat records, answer offsets checked against contexts, windows
over long contexts mapped back to characters, the official SQuAD scores, the overlap baseline, and a tiny model
trained end to end that answers with offsets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED

from afinar import cli
from afinar.core.config import DataArgs, QAArgs
from afinar.data import answers
from afinar.evaluation import squad

XQUAD = SHARED / "xquad"


def squad_slice(split: str, questions: int, language: str = "en") -> dict:
    """The first articles' paragraphs of a real XQuAD file, cut to `questions` questions."""
    data = json.loads((XQUAD / f"{split}.{language}.json").read_text(encoding="utf-8"))
    kept, left = [], questions
    for article in data["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if left <= 0:
                break
            qas = paragraph["qas"][:left]
            left -= len(qas)
            paragraphs.append({"context": paragraph["context"], "qas": qas})
        if paragraphs:
            kept.append({"title": article.get("title", ""), "paragraphs": paragraphs})
    return {"version": data.get("version", "1.1"), "data": kept}


def test_squad_json_and_flat_records_read_the_same_questions(tmp_path):
    data = squad_slice("train", 12)
    questions = answers.squad_questions(data, "x")
    assert len(questions) == 12
    q = questions[0]
    assert q.context[q.starts[0]:q.starts[0] + len(q.answers[0])] == q.answers[0]
    flat = tmp_path / "train.jsonl"
    flat.write_text("".join(json.dumps({"id": x.id, "question": x.question, "context": x.context,
                                        "answers": {"text": x.answers, "answer_start": x.starts}}) + "\n"
                            for x in questions), encoding="utf-8")
    assert answers.read_questions_file(flat, DataArgs()) == questions


def test_an_answer_offset_that_misses_its_context_is_a_one_line_error_naming_the_question(tmp_path, capsys):
    data = squad_slice("train", 5)
    bad = data["data"][0]["paragraphs"][0]["qas"][1]
    bad["answers"][0]["answer_start"] += 3
    (tmp_path / "train.json").write_text(json.dumps(data), encoding="utf-8")
    assert cli.main(["check", "--set", "task=question_answering", "--data", str(tmp_path / "train.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"question {bad['id']!r}" in err and "answer_start" in err and "\n" not in err


def test_long_contexts_are_windows_whose_labels_and_offsets_find_the_answer():
    from transformers import AutoTokenizer

    from afinar.core.assets import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm-l6"))
    questions = answers.squad_questions(squad_slice("test", 20), "x")
    args = QAArgs(max_seq_length=64, doc_stride=16)
    spans = [(q.starts[0], q.starts[0] + len(q.answers[0])) for q in questions]
    features = answers.encode_questions(tokenizer, [q.question for q in questions], [q.context for q in questions],
                                        args, spans)
    assert len(features) > 2 * len(questions)  # contexts of 100-200 words in 64-token windows
    assert all(len(ids) <= 64 for ids in features.encodings["input_ids"])
    holding = {}
    for row, owner in enumerate(features.question):
        start, end = features.encodings["start_positions"][row], features.encodings["end_positions"][row]
        if start == 0:
            continue
        context = questions[owner].context
        assert context[features.offsets[row][start][0]:features.offsets[row][end][1]].lower() == \
            questions[owner].answers[0].lower()
        holding[owner] = row
    assert len(holding) == len(questions)  # every answer lies whole in some window
    # logits that point at the labelled tokens are decoded back to the gold answers
    width = max(len(ids) for ids in features.encodings["input_ids"])
    start_logits, end_logits = np.zeros((len(features), width)), np.zeros((len(features), width))
    for owner, row in holding.items():
        start_logits[row, features.encodings["start_positions"][row]] = 10
        end_logits[row, features.encodings["end_positions"][row]] = 10
    found = answers.best_spans(features, start_logits, end_logits, [q.context for q in questions], args)
    assert [q.context[s:e].lower() for q, (s, e, _) in zip(questions, found)] == [q.answers[0].lower()
                                                                                  for q in questions]


def test_validation_is_carved_by_context_and_malformed_files_are_one_line_errors(tmp_path, capsys):
    from afinar.core.config import load_config
    from afinar.tasks.question_answering import checked_questions

    (tmp_path / "train.json").write_text(json.dumps(squad_slice("train", 60)), encoding="utf-8")
    splits, record, _ = checked_questions(load_config(overrides=["task=question_answering",
                                                                 f"data.source={tmp_path / 'train.json'}"]))
    assert not {q.context for q in splits.train} & {q.context for q in splits.validation}
    dropped = sum(len(action["rows"]) for action in record["actions"])  # a repeated question on its context
    assert len(splits.train) + len(splits.validation) == 60 - dropped and record["qa"]["contexts"]["validation"] >= 1
    broken = squad_slice("train", 3)
    broken["data"][0]["paragraphs"][0]["qas"][0]["answers"] = [{"text": "x"}]  # no answer_start
    (tmp_path / "bad.json").write_text(json.dumps(broken), encoding="utf-8")
    assert cli.main(["check", "--set", "task=question_answering", "--data", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "answer_start (a number)" in err and "\n" not in err


def test_official_squad_normalisation_and_best_of_several_answers():
    assert squad.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert squad.best_over_golds(squad.exact_match, "Broncos", ["Denver Broncos", "the Broncos"]) == 1.0
    assert squad.token_f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    report = squad.answer_report(["Denver", "Paris"], [["Denver Broncos"], ["Rome"]], ["a", "b"])
    assert report["f1"] == pytest.approx((2 / 3) / 2) and report["exact_match"] == 0.0
    question = "How many points did the Panthers defense surrender?"
    context = "The Panthers won. The Panthers defense gave up just 308 points, ranking sixth. It rained."
    assert squad.overlap_sentence(question, context) == "The Panthers defense gave up just 308 points, ranking sixth."


def test_training_scores_against_the_baseline_and_answers_with_offsets(tiny_bert, tmp_path, capsys):
    (tmp_path / "train.json").write_text(json.dumps(squad_slice("train", 48)), encoding="utf-8")
    (tmp_path / "dev.json").write_text(json.dumps(squad_slice("test", 40, "es")), encoding="utf-8")
    (tmp_path / "test.json").write_text(json.dumps(squad_slice("test", 16)), encoding="utf-8")
    out = tmp_path / "runs"
    # validation has more windows than test: each split is decoded with its own windows
    assert cli.main(["train", "--set", "task=question_answering", "--model", str(tiny_bert),
                     "--data", str(tmp_path / "train.json"), "--test", str(tmp_path / "test.json"),
                     "--set", f"data.validation={tmp_path / 'dev.json'}",
                     "--set", f"train.output_dir={out}", "--set", "train.run_name=r", "--set", "train.max_steps=3",
                     "--set", "train.batch_size=8", "--set", "qa.max_seq_length=96", "--set", "qa.doc_stride=32",
                     "--set", "train.precision=fp32"]) == 0
    printed = capsys.readouterr().out
    assert "test: exact match" in printed and "baseline EM" in printed
    metrics = json.loads((out / "r" / "metrics.json").read_text())
    test = metrics["test"]
    assert test["n"] == 16 and 0 <= test["f1"] <= 1 and test["baseline"]["metric"] == "f1"
    assert test["vs_baseline"]["f1"]["delta"] == pytest.approx(test["f1"] - test["baseline_scores"]["f1"])
    assert metrics["validation"]["n"] == 40
    question, context = "Who won?", "After a long season the Denver Broncos won the final game."
    assert cli.main(["predict", str(out / "r"), "--question", question, "--context", context, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["text"] == question and len(answer["spans"]) == 1
    span = answer["spans"][0]
    assert context[span["start"]:span["end"]] == span["text"] and span["type"] == "answer"
    assert cli.main(["predict", str(out / "r"), question]) == 2  # a question without its context
    assert "reads sentence pairs" in capsys.readouterr().err
