import gzip
import json

import pandas as pd
import pytest
from conftest import SHARED, TWEETS, tweet_rows

from afinar.core.config import DataArgs
from afinar.core.errors import AfinarError
from afinar.data.sources import encode, load_labelled_file, load_splits, read_table, read_texts, tokenize


def _rows(n=60):
    return tweet_rows("train", n)


def write(path, rows, fmt):
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "parquet":
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    rows = _rows()
    path = write(tmp_path / f"train.{fmt}", rows, fmt)
    splits = load_splits(DataArgs(source=str(path), validation_fraction=0.2))
    assert splits.label_names == ["negative", "neutral", "positive"]  # names from label_text, ids from label
    assert len(splits.train) + len(splits.validation) == len(rows)
    expected = {r["text"]: r["label"] for r in rows}
    for row in splits.train:
        assert expected[row["text"]] == row["label"]
    assert splits.fingerprints["train"] and splits.notes[0].startswith("validation carved from train")


def test_real_kaggle_csv_detects_sentiment_column_and_keeps_empty_text():
    splits = load_splits(DataArgs(source=str(TWEETS / "train.csv"), test=str(TWEETS / "test.csv")))
    assert splits.label_names == ["negative", "neutral", "positive"]
    assert len(splits.train) + len(splits.validation) == 27481 and len(splits.test) == 3534
    assert "" in set(splits.train["text"]) | set(splits.validation["text"])
    assert splits.fingerprints["test"] == "192cc91b9e456a23c7e0a3c565d53d41db6497bfcd78f6130f50adfd1d900aed"


def test_embedded_tweets_match_the_shared_files():
    splits = load_splits(DataArgs(source="tweets", max_test_samples=100))
    assert len(splits.train) + len(splits.validation) == 27481
    assert len(splits.test) == 100
    assert any("test: seeded subset of 100 of 3,534 rows" in n for n in splits.notes)


def test_validation_is_stratified_and_seeded(tmp_path):
    path = write(tmp_path / "train.jsonl", _rows(200), "jsonl")
    a = load_splits(DataArgs(source=str(path), validation_fraction=0.25), seed=1)
    b = load_splits(DataArgs(source=str(path), validation_fraction=0.25), seed=1)
    c = load_splits(DataArgs(source=str(path), validation_fraction=0.25), seed=2)
    assert a.validation["text"] == b.validation["text"] != c.validation["text"]
    train_share = pd.Series(a.train["label"]).value_counts(normalize=True).sort_index()
    val_share = pd.Series(a.validation["label"]).value_counts(normalize=True).sort_index()
    assert (train_share - val_share).abs().max() < 0.03


def test_max_train_samples_is_the_tutorials_seeded_shuffle(tmp_path):
    path = write(tmp_path / "train.jsonl", _rows(200), "jsonl")
    splits = load_splits(DataArgs(source=str(path), max_train_samples=50), seed=42)
    assert len(splits.train) == 50
    again = load_splits(DataArgs(source=str(path), max_train_samples=50), seed=42)
    assert splits.train["text"] == again.train["text"]


def test_folder_with_split_files_and_gzip(tmp_path):
    rows = _rows(90)
    write(tmp_path / "train.csv", rows[:60], "csv")
    with gzip.open(tmp_path / "valid.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows[60:75])
    write(tmp_path / "test.parquet", rows[75:], "parquet")
    splits = load_splits(DataArgs(source=str(tmp_path)))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (60, 15, 15)
    assert not splits.notes or "carved" not in splits.notes[0]


def test_string_labels_sorted_and_integer_labels_without_names(tmp_path):
    path = write(tmp_path / "s.csv", [{"review": f"t{i}", "category": c} for i, c in
                                      enumerate(["spam", "ham", "eggs"] * 10)], "csv")
    assert load_splits(DataArgs(source=str(path))).label_names == ["eggs", "ham", "spam"]
    path = write(tmp_path / "i.csv", [{"sentence": f"t{i}", "target": i % 2} for i in range(30)], "csv")
    assert load_splits(DataArgs(source=str(path))).label_names == ["0", "1"]


def test_named_columns_override_detection(tmp_path):
    path = write(tmp_path / "x.csv", [{"a": f"t{i}", "b": "yes" if i % 2 else "no", "text": "x"}
                                      for i in range(30)], "csv")
    splits = load_splits(DataArgs(source=str(path), text_column="a", label_column="b"))
    assert splits.label_names == ["no", "yes"] and splits.train[0]["text"].startswith("t")


def test_load_labelled_file_maps_to_existing_label_space(tmp_path):
    path = write(tmp_path / "e.jsonl", tweet_rows("test", 30), "jsonl")
    ds = load_labelled_file(path, DataArgs(), ["negative", "neutral", "positive"])
    assert len(ds) == 30 and set(ds["label"]) <= {0, 1, 2}


def test_read_texts_from_txt_and_csv(tmp_path):
    (tmp_path / "t.txt").write_text("good\n\nbad\n")
    assert read_texts(tmp_path / "t.txt", DataArgs()) == ["good", "bad"]
    write(tmp_path / "t.csv", [{"text": "fine", "id": 1}], "csv")
    assert read_texts(tmp_path / "t.csv", DataArgs()) == ["fine"]


def test_tokenize_truncates_never_pads_and_keeps_empty_rows(tiny_gpt2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.pad_token = tokenizer.eos_token
    from datasets import Dataset

    ds = tokenize(Dataset.from_dict({"text": ["hi", "word " * 100, ""], "label": [0, 1, 0]}), tokenizer, 16)
    assert ds["length"] == [1, 16, 1]
    assert ds[2]["input_ids"] == [tokenizer.eos_token_id]
    assert encode(tokenizer, ["a b c"], 2)["input_ids"] == [tokenizer("a b")["input_ids"]]


# Bad input: each case is one line that names the file / row / column and the fix.
BAD_INPUTS = [
    ("missing.csv", None, "missing.csv: file not found"),
    ("empty.csv", b"", "empty.csv: file is empty"),
    ("data.xlsx", b"x", "unknown file format .xlsx"),
    ("ragged.csv", b"text,label\na,pos\nb,neg,extra\n", "ragged.csv: line 3 has 3 fields but the header has 2"),
    ("quote.csv", b'text,label\n"unclosed,pos\nb,neg\n', "quote.csv: broken CSV near line"),
    ("latin.csv", "text,label\ncaf\u00e9,pos\nb,neg\n".encode("latin-1"),
     "latin.csv: line 2 is not valid utf-8 (byte 0xe9); set data.encoding"),
    ("bad.jsonl", b'{"text": "a", "label": 1}\n{"text": \n', "bad.jsonl: line 2 is not valid JSON"),
    ("notext.csv", b"foo,label\na,pos\nb,neg\n", "no text column found (columns seen: foo, label); name it with "
                                                 "--set data.text_column=<column>"),
    ("nolabel.csv", b"text,bar\na,1\nb,2\n", "no label column found (columns seen: text, bar)"),
    ("single.csv", b"text,label\na,pos\nb,pos\nc,pos\n", "only one class ('pos')"),
    ("float.csv", b"text,label\na,0.5\nb,1.25\nc,0.75\n", "holds non-integer numbers"),
    ("ids.csv", b"text,label\n" + b"".join(b"t%d,id%d\n" % (i, i) for i in range(40)),
     "has 40 distinct values in 40 rows; that looks like free text or ids"),
    ("huge.csv", b"text,label\n" + b"x" * 1_048_576 + b",pos\nb,neg\n",
     "row 1 has a text of 1,048,576 characters (limit data.max_text_chars=100,000)"),
    ("emptylabel.csv", b"text,label\na,pos\nb,\n", "row 2 has an empty label"),
]


@pytest.mark.parametrize("name, content, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AfinarError) as info:
        load_splits(DataArgs(source=str(path)))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_label_unseen_in_train_is_an_error(tmp_path):
    train = write(tmp_path / "train.csv", [{"text": f"t{i}", "label": ["a", "b"][i % 2]} for i in range(20)], "csv")
    test = write(tmp_path / "test.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}], "csv")
    with pytest.raises(AfinarError, match=r"test.csv: row 2 has label 'c', which train never has"):
        load_splits(DataArgs(source=str(train), test=str(test)))


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(AfinarError, match="could not be loaded from the Hugging Face hub"):
        load_splits(DataArgs(source="nobody/no-such-dataset"))


def test_input_files_are_not_modified(tmp_path):
    path = write(tmp_path / "train.csv", _rows(40), "csv")
    before = path.read_bytes()
    load_splits(DataArgs(source=str(path)))
    assert path.read_bytes() == before
    assert read_table(path).shape[0] == 40


def test_hub_labels_outside_the_classes_are_refused_not_invented(monkeypatch):
    """GLUE-style test splits label every row -1; mapped through the class names, -1 became the last class."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    hub = DatasetDict({"train": Dataset.from_dict({"sentence": ["good", "bad"] * 5, "label": [1, 0] * 5},
                                                  features=features),
                       "test": Dataset.from_dict({"sentence": ["fine", "awful"], "label": [-1, -1]},
                                                 features=features)})
    monkeypatch.setattr("datasets.load_dataset", lambda name, *a, **k: hub)
    with pytest.raises(AfinarError, match=r"hub:glue/sst2.*2 of 2 rows have label id -1 .*outside the 2 classes"):
        load_splits(DataArgs(source="glue/sst2"))
    unscored = load_splits(DataArgs(source="glue/sst2"), with_test=False)  # train alone is labelled: fine
    assert len(unscored.train) + len(unscored.validation) == 10


@pytest.mark.parametrize("missing", ["NaN", "null", "N/A"])  # empty: test_bad_input_is_a_one_line_error
def test_a_missing_label_in_a_csv_is_an_error_not_a_class(tmp_path, missing):
    rows = [{"text": f"text {i}", "label": ["pos", "neg"][i % 2]} for i in range(10)]
    rows[6]["label"] = missing
    path = write(tmp_path / "train.csv", rows, "csv")
    with pytest.raises(AfinarError, match=r"row 7 has a missing label"):
        load_splits(DataArgs(source=str(path)))


def test_a_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\n" + b"".join(f"t{i},{'ab'[i % 2]}\n".encode() for i in range(10)))
    splits = load_splits(DataArgs(source=str(path), text_column="text"))
    assert splits.label_names == ["a", "b"] and len(splits.train) + len(splits.validation) == 10


def test_a_tsv_whose_quotes_belong_to_the_texts_is_read_with_quoting_off():
    """GLUE's RTE TSV has unbalanced quotes inside sentences; every row still has the header's four fields."""
    frame = read_table(SHARED / "rte" / "train.tsv")
    assert frame.shape == (1244, 4) and set(frame["label"]) == {"entailment", "not_entailment"}
    assert frame["sentence1"].str.contains('"').any()
