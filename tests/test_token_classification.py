"""Token classification: CoNLL / JSONL / hub reading, tag checks, windows for long sentences, strict IOB2 entity
scores, and a tiny model trained end to end that predicts, serves and re-evaluates entities with offsets."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import SHARED

from afinar import cli
from afinar.core.config import DataArgs, TaggingArgs, load_config
from afinar.core.errors import AfinarError
from afinar.data import tagging
from afinar.evaluation.entities import entity_report

WNUT = SHARED / "wnut17"


def wnut_sentences(split: str, n: int) -> list[tagging.Sentence]:
    return tagging.read_conll(WNUT / f"{split}.conll")[:n]


def write_conll(path, sentences: list[tagging.Sentence]) -> None:
    path.write_text("\n\n".join("\n".join(f"{t}\t{g}" for t, g in zip(s.tokens, s.tags)) for s in sentences) + "\n",
                    encoding="utf-8")


# ---------------------------------------------------------------- reading


def test_conll_four_columns_docstart_and_whitespace_lines(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n"
                    "   \nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n", encoding="utf-8")
    sentences = tagging.read_conll(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]
    chunks = tagging.read_conll(path, tag_column="2")  # a named column: the chunk tags
    assert chunks[0].tags == ["B-NP", "B-VP", "B-NP"]


def test_tab_separated_tokens_may_hold_spaces_and_a_missing_tag_names_its_line(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("New York\tB-location\nis\tO\n\nfine\n", encoding="utf-8")
    with pytest.raises(AfinarError, match=r"train\.conll:4: expected a token and its tag"):
        tagging.read_conll(path)
    path.write_text("New York\tB-location\nis\tO\n", encoding="utf-8")
    assert tagging.read_conll(path)[0].tokens == ["New York", "is"]


def test_records_and_hub_class_label_names_become_tags(tmp_path, monkeypatch):
    import datasets

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"tokens": ["Paris", "rocks"], "tags": ["B-location", "O"]}) + "\n"
                    + json.dumps({"tokens": ["x"], "tags": ["O", "O"]}) + "\n", encoding="utf-8")
    with pytest.raises(AfinarError, match=r"train\.jsonl row 1: 1 tokens but 2 tags"):
        tagging.read_tagged_file(path, DataArgs(), TaggingArgs())
    names = ["O", "B-PER", "I-PER"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"tokens": [["Ann", "Lee", "sings"]], "ner_tags": [[1, 2, 0]]}, features=features)})
    monkeypatch.setattr(datasets, "load_dataset", lambda source, *a, **k: hub)
    splits = tagging.read_tagged_splits(DataArgs(source="someone/ner-data"), TaggingArgs())
    assert splits.train[0].tags == ["B-PER", "I-PER", "O"] and splits.sources["train"] == "hub:someone/ner-data"


def test_invalid_transitions_are_counted_and_repaired_only_on_request(tmp_path, capsys):
    sentences = wnut_sentences("train", 60)
    broken = tagging.Sentence(["the", "Empire", "State"], ["O", "I-location", "I-location"])
    write_conll(tmp_path / "train.conll", sentences + [broken])
    write_conll(tmp_path / "test.conll", wnut_sentences("test", 20))
    assert tagging.invalid_transitions(broken.tags) == [1]
    assert tagging.repair_transitions(broken.tags) == ["O", "B-location", "I-location"]
    assert tagging.entities([broken.tags]) == [[]]  # strict IOB2: no entity starts with I-
    for repair, expected in (("false", "kept (train 1)"), ("true", "repaired to B- (tagging.repair_iob): train 1")):
        assert cli.main(["check", "--set", "task=token_classification", "--data", str(tmp_path),
                         "--set", f"tagging.repair_iob={repair}"]) == 0
        out = capsys.readouterr().out
        assert "invalid I- transitions: train 1, test 0" in out
    config = load_config(overrides=["task=token_classification", f"data.source={tmp_path}", "tagging.repair_iob=true"])
    from afinar.tasks.token_classification import checked_sentences

    splits, record, _ = checked_sentences(config)
    repaired = [s for s in splits.train + splits.validation if s.tokens == broken.tokens]
    assert repaired[0].tags == ["O", "B-location", "I-location"] and record["tagging"]["repaired"]


def test_held_out_tags_train_never_has_are_a_one_line_error(tmp_path, capsys):
    write_conll(tmp_path / "train.conll", [tagging.Sentence(["Ann"], ["B-PER"])] * 3)
    write_conll(tmp_path / "test.conll", [tagging.Sentence(["Oslo"], ["B-LOC"])])
    assert cli.main(["check", "--set", "task=token_classification", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "(test): tags B-LOC never occur in train" in err and "\n" not in err


# ---------------------------------------------------------------- windows and scores


def test_a_long_sentence_is_split_into_windows_and_every_word_is_labelled_once():
    from transformers import AutoTokenizer

    from afinar.core.assets import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm-l6"))
    words = [f"word{i}" for i in range(60)]  # "word12" is 3 sub-tokens: 180 in all
    tags = [i % 3 for i in range(60)]
    windows = tagging.encode_windows(tokenizer, [words, ["short"]], max_length=32, stride=8,
                                     tags=[tags, [1]])
    assert windows.split_sentences == 1 and len(windows) > 6
    assert all(len(ids) <= 32 for ids in windows.encodings["input_ids"])
    owned = [w for row in windows.words for w in row]
    assert sorted(owned) == sorted([(0, i) for i in range(60)] + [(1, 0)])  # each word once
    for row, (ids, labels) in enumerate(zip(windows.encodings["input_ids"], windows.encodings["labels"])):
        labelled = [label for label in labels if label != tagging.IGNORE]
        assert labelled == [tags[i] if s == 0 else 1 for s, i in windows.words[row]]  # first sub-tokens carry them
    per_word = [[label for label in labels if label != tagging.IGNORE] for labels in windows.encodings["labels"]]
    assert tagging.words_per_sentence(windows, per_word, [60, 1]) == [tags, [1]]


def test_entity_figures_equal_seqeval_strict_and_intervals_hold_them():
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    sentences = wnut_sentences("dev", 300)
    gold = [s.tags for s in sentences]
    names = tagging.tag_names(sentences)
    rng = random.Random(0)
    predicted = [[t if rng.random() < 0.8 else rng.choice(names) for t in tags] for tags in gold]
    report = entity_report(gold, predicted)
    expected = classification_report(gold, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    assert report["f1"] == pytest.approx(expected["micro avg"]["f1-score"])
    assert report["precision"] == pytest.approx(expected["micro avg"]["precision"])
    assert report["macro_f1"] == pytest.approx(expected["macro avg"]["f1-score"])
    for kind, row in report["per_type"].items():
        assert row["f1"] == pytest.approx(expected[kind]["f1-score"]) and row["support"] == expected[kind]["support"]
    low, high = report["ci95"]["f1"]
    assert low < report["f1"] < high and high - low < 0.3
    # a type only predicted counts in the macro average, as in seqeval (F1 0 for it)
    only_predicted = entity_report([["B-PER", "O", "O"]], [["B-PER", "B-LOC", "O"]])
    assert only_predicted["macro_f1"] == pytest.approx(0.5) and only_predicted["per_type"]["LOC"]["support"] == 0


def test_predicted_entities_carry_character_offsets_into_the_text_as_sent(tiny_bert):
    """Offsets through punctuation, double spaces and non-ASCII, with the model's word probabilities stubbed so
    the words tagged are known."""
    from afinar.inference.spans import EntityTagger, words_with_offsets

    tagger = EntityTagger.__new__(EntityTagger)
    from transformers import AutoTokenizer

    tagger.tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tagger.labels = ["O", "B-location", "I-location", "B-person", "I-person"]
    text = "Off to  São Paulo,with José!  (again)"
    words = words_with_offsets(tagger.tokenizer, text)
    assert all(text[start:end] == word for word, (start, end) in words)
    tags = {"São": "B-location", "Paulo": "I-location", "José": "B-person"}

    def probabilities(sentences):
        return [np.eye(len(tagger.labels))[[tagger.labels.index(tags.get(w, "O")) for w in s]] for s in sentences]

    tagger.word_probabilities = probabilities
    spans = tagger.predict([text])[0].spans
    assert [(s.text, s.type) for s in spans] == [("São Paulo", "location"), ("José", "person")]
    assert all(text[s.start:s.end] == s.text and s.score == 1.0 for s in spans)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tagger_run(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ner")
    write_conll(folder / "train.conll", wnut_sentences("train", 120))
    write_conll(folder / "dev.conll", wnut_sentences("dev", 30))
    write_conll(folder / "test.conll", wnut_sentences("test", 30))
    out = folder / "runs"
    assert cli.main(["train", "--set", "task=token_classification", "--model", str(tiny_bert), "--data", str(folder),
                     "--set", f"train.output_dir={out}", "--set", "train.run_name=r", "--set", "train.max_steps=6",
                     "--set", "train.batch_size=16", "--set", "train.learning_rate=5e-3",
                     "--set", "data.max_length=24", "--set", "train.precision=fp32"]) == 0
    return out / "r", folder


def test_training_reports_entity_f1_with_intervals_and_the_report_marks_spans(tagger_run):
    run_dir, _ = tagger_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics["test"]
    assert test["n"] == 30 and test["entities"] == sum(tagging.tag_counts(wnut_sentences("test", 30)).values())
    assert test["ci95"]["f1"][0] <= test["f1"] <= test["ci95"]["f1"][1]
    assert json.loads((run_dir / "manifest.json").read_text())["data"]["tags"][0] == "O"
    summary = (run_dir / "summary.md").read_text()
    assert "strict IOB2" in summary and "| type (test) |" in summary
    assert "Entities per type" in (run_dir / "report.html").read_text()
    data_report = json.loads((run_dir / "data_report.json").read_text())
    assert data_report["tagging"]["windows"]["train"] > 0  # max_length 24 splits some tweets into windows


def test_predict_serve_and_evaluate_give_entities_with_offsets(tagger_run, capsys):
    from fastapi.testclient import TestClient

    from afinar.inference.spans import EntityTagger
    from afinar.serving.app import create_app

    run_dir, folder = tagger_run
    text = "Going to see Taylor Swift at Madison Square Garden tonight!!"
    assert cli.main(["predict", str(run_dir), text, "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["text"] == text
    for span in predicted["spans"]:
        assert text[span["start"]:span["end"]] == span["text"] and 0 < span["score"] <= 1
    with TestClient(create_app(run_dir)) as client:
        served = client.post("/predict", json={"texts": [text]}).json()
    assert served["predictions"][0] == predicted
    # re-scoring reproduces training's test figure (the same words, windows and model)
    assert cli.main(["evaluate", str(run_dir), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    trained = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert evaluated["f1"] == pytest.approx(trained["f1"]) and evaluated["n"] == trained["n"]
    words = EntityTagger(run_dir / "model").tag([["Taylor", "Swift"]])
    assert len(words[0]) == 2 and np.all([t in tagging.tag_names(wnut_sentences("train", 120)) for t in words[0]])


def test_onnx_export_tags_as_torch_does(tagger_run, capsys):
    from afinar.inference.spans import EntityTagger

    run_dir, _ = tagger_run
    assert cli.main(["export", str(run_dir), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "onnx: " in printed and "tags agree with torch" in printed
    record = json.loads((run_dir / "onnx" / "export.json").read_text())
    assert record["backends"]["onnx"]["max_abs_probability_diff"] <= 1e-4
    assert record["check"]["sentences"] == 30 and record["labels"][0] == "O"
    text = "Going to see Taylor Swift at Madison Square Garden tonight!!"
    assert cli.main(["predict", str(run_dir), text, "--json", "--backend", "onnx"]) == 0
    onnx_spans = json.loads(capsys.readouterr().out)["spans"]
    torch_spans = [s.to_dict() for s in EntityTagger(run_dir / "model", 24).predict([text])[0].spans]
    assert [(s["start"], s["end"], s["type"]) for s in onnx_spans] == [(s["start"], s["end"], s["type"])
                                                                        for s in torch_spans]
