"""Data checks: the published counts of the real tweet data, its speed, a planted leak, and each policy."""

import json
import time

import pytest
from conftest import TWEETS
from datasets import Dataset

from afinar.core.config import CheckArgs, Config, DataArgs, ModelArgs
from afinar.core.errors import AfinarError
from afinar.data.checks import (
    apply_policies,
    check,
    format_report,
    imbalance_advice,
    normalise,
    run_checks,
    shingles,
    small_data_advice,
)
from afinar.data.sources import Splits, load_splits, read_table

NAMES = ["negative", "neutral", "positive"]


def dataset(texts, labels=None) -> Dataset:
    texts = list(texts)
    return Dataset.from_dict({"text": texts, "label": list(labels) if labels is not None else [1] * len(texts)})


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Written out here rather than taken from afinar, so the tests do not trust the code they test."""
    grams_a = {a[i:i + n] for i in range(max(1, len(a) - n + 1))}
    grams_b = {b[i:i + n] for i in range(max(1, len(b) - n + 1))}
    return len(grams_a & grams_b) / len(grams_a | grams_b)


@pytest.fixture(scope="module")
def kaggle() -> tuple[Splits, object, float]:
    """The whole published train (27,481 rows, file order) and test (3,534) with an empty validation split,
    their report under the default checks, and the seconds the checks took."""
    def read(name):
        frame = read_table(TWEETS / name)
        return dataset(frame["text"], [NAMES.index(s) for s in frame["sentiment"]])

    splits = Splits(read("train.csv"), dataset([]), read("test.csv"), NAMES)
    start = time.perf_counter()
    report = run_checks(splits, CheckArgs())
    return splits, report, time.perf_counter() - start


def test_published_tweet_counts(kaggle):
    """The counts published for this data; the time is printed, not asserted (speed lives in bench/)."""
    splits, report, seconds = kaggle
    print(f"\nchecks on 27,481 train x 3,534 test rows: {seconds:.2f} s\n{format_report(report)}")
    assert report.rows == {"train": 27481, "validation": 0, "test": 3534}
    assert report.empty["train"].count == 1 and report.empty["train"].examples[0]["text"] == ""
    assert report.empty["test"].count == 0
    dups = report.duplicates["train"]
    assert dups.detail["verbatim"] == 31  # the published count (texts equal up to the leading space)
    assert dups.count == 88  # case differences and URLs/mentions add 57 more
    leak = report.leakage["train-test"]
    assert leak["exact"].detail["verbatim"] == 8  # published: 8 test texts also occur verbatim in train
    assert leak["exact"].count == 28 and leak["near"].count == 28
    assert report.conflicts.count == 8
    assert report.mojibake["train"].count == 156 and report.mojibake["test"].count == 14  # 155 'ï¿½' + 1 'Â\xa0'
    assert report.balance["train"]["counts"] == {"negative": 7781, "neutral": 11118, "positive": 8582}
    assert report.balance["test"]["baseline"] == pytest.approx(1430 / 3534)
    # every near-duplicate train row really is over the threshold against some test row, and none is exact
    train, test = [normalise(t) for t in splits.train["text"]], [normalise(t) for t in splits.test["text"]]
    assert not set(leak["near"].indices) & set(leak["exact"].indices)
    for row in leak["near"].indices:
        assert max(jaccard(train[row], t) for t in test) >= 0.8
    assert all(train[row] in set(test) for row in leak["exact"].indices)
    assert "indices" not in json.dumps(report.to_dict())


def _edits(text: str, kind: int) -> str:
    """Small edits in the middle of a text: a changed letter, two, an appended word, a deleted letter, or
    an upper-cased text with a changed letter (case alone is normalised away, so it would be an exact leak)."""
    mid = next(i for i in range(len(text) // 2, len(text)) if text[i].isalpha() and text[i + 1].isalpha())
    swap = "q" if text[mid].lower() != "q" else "z"
    return [text[:mid] + swap + text[mid + 1:],
            text[:mid] + swap * 2 + text[mid + 2:],
            text + " lol",
            text[:mid] + text[mid + 1:],
            (text[:mid] + swap + text[mid + 1:]).upper()][kind % 5]


def test_planted_leak_is_found_exactly_and_as_near_duplicates(kaggle):
    splits, before, _ = kaggle
    seen = {normalise(t) for t in splits.train["text"]}
    test_norm = [normalise(t) for t in splits.test["text"]]
    picks = [i for i, (t, n) in enumerate(zip(splits.test["text"], test_norm))
             if len(n) >= 100 and n not in seen and test_norm.count(n) == 1 and not any(m in t for m in "@/")][:100]
    copies = [splits.test[i] for i in picks[:50]]
    edited = [{"text": _edits(splits.test[i]["text"], k), "label": splits.test[i]["label"]}
              for k, i in enumerate(picks[50:])]
    assert all(jaccard(normalise(e["text"]), test_norm[i]) >= 0.85 for e, i in zip(edited, picks[50:]))
    start = len(splits.train)
    rows = list(splits.train) + copies + edited
    planted = Splits(dataset([r["text"] for r in rows], [r["label"] for r in rows]), splits.validation,
                     splits.test, NAMES)
    leak = run_checks(planted, CheckArgs()).leakage["train-test"]
    copied, changed = set(range(start, start + 50)), set(range(start + 50, start + 100))
    assert copied <= set(leak["exact"].indices) and not changed & set(leak["exact"].indices)
    assert leak["exact"].count == before.leakage["train-test"]["exact"].count + 50
    assert leak["exact"].detail["verbatim"] == before.leakage["train-test"]["exact"].detail["verbatim"] + 50
    found = len(changed & set(leak["near"].indices))
    print(f"\nnear-duplicate recall on 50 edited test rows: {found}/50")
    assert found >= 45 and not copied & set(leak["near"].indices)
    assert leak["near"].count >= found  # each edited row is near its own test row


def test_load_splits_then_drop_leaves_a_clean_train_split():
    splits = load_splits(DataArgs(source=str(TWEETS / "train.csv"), test=str(TWEETS / "test.csv")))
    report = run_checks(splits, CheckArgs())
    cleaned = apply_policies(splits, report, CheckArgs())
    dropped = {row for action in report.actions for row in action["rows"]}
    assert len(cleaned.train) == len(splits.train) - len(dropped) > 24000
    assert cleaned.validation is splits.validation and cleaned.test is splits.test
    assert len(cleaned.notes) == len(splits.notes) + len(report.actions)
    again = run_checks(cleaned, CheckArgs())
    assert again.empty["train"].count == again.duplicates["train"].count == again.conflicts.count == 0
    for pair in ("train-validation", "train-test"):
        assert again.leakage[pair]["exact"].count == again.leakage[pair]["near"].count == 0
    assert again.leakage["validation-test"] == report.leakage["validation-test"]  # held-out rows are never touched


@pytest.fixture
def small() -> Splits:
    train = [("I loved this film so much", 2),
             ("i loved this film  so much ", 2),  # 1: duplicate of 0 after normalisation
             ("Terrible acting throughout", 0),
             ("terrible acting throughout", 1),  # 3: conflicts with 2 (and repeats it)
             ("   ", 1),  # 4: empty
             ("The soundtrack was fine", 1),
             ("A leaked test sentence about cinema http://t.co/x", 1),  # 6: exact leak into test
             ("The long review of this movie that also appears in the validation split", 2),  # 7: near leak
             (" The soundtrack was fine", 1),  # 8: verbatim duplicate of 5
             ("Nothing wrong with this one", 2)]
    return Splits(dataset(*zip(*train)),
                  dataset(["The long review of this movie that also appears in the validation split too"]),
                  dataset(["@critic a leaked  TEST sentence about cinema", "", "same", "same"]), NAMES)


def test_findings_on_a_hand_made_dataset(small):
    report = run_checks(small, CheckArgs())
    assert report.empty["train"].indices == [4] and report.empty["test"].indices == [1]
    assert report.duplicates["train"].indices == [1, 3, 8] and report.duplicates["train"].detail["verbatim"] == 1
    assert report.duplicates["test"].count == 1
    assert report.conflicts.count == 1 and report.conflicts.indices == [2, 3]
    assert report.conflicts.examples[0]["labels"] == {"negative": 1, "neutral": 1}
    exact, near = report.leakage["train-test"]["exact"], report.leakage["train-validation"]["near"]
    assert exact.indices == [6] and exact.count == 1 and exact.detail["verbatim"] == 0  # equal only normalised
    assert near.indices == [7] and near.examples[0]["similarity"] >= 0.8
    assert report.leakage["train-validation"]["exact"].count == report.leakage["train-test"]["near"].count == 0
    assert report.balance["train"]["majority"] == "neutral" and report.balance["train"]["baseline"] == 0.5


def test_drop_removes_only_the_flagged_train_rows_and_says_so(small):
    report = run_checks(small, CheckArgs())
    cleaned = apply_policies(small, report, CheckArgs())
    assert cleaned.train["text"] == [small.train[i]["text"] for i in (0, 5, 9)]
    assert cleaned.test["text"] == small.test["text"]  # held-out empty and duplicate rows stay
    assert len(small.train) == 10 and small.notes == []  # the input is not changed
    assert cleaned.notes == [
        "dropped 1 empty or whitespace-only train rows",
        "dropped 2 train rows of 1 texts with conflicting labels",
        "dropped 2 train rows repeating an earlier train text (after normalisation) (1 more already dropped above)",
        "dropped 1 train rows that are near-duplicates of validation rows (Jaccard >= 0.8)",
        "dropped 1 train rows that also occur in test (exact)"]
    assert [a["rows"] for a in report.actions] == [[4], [2, 3], [1, 8], [7], [6]]
    table = format_report(report)
    assert "actions:" in table and "dropped 1 train rows that also occur in test (exact)" in table


def test_error_raises_one_line_naming_counts_and_keys_and_changes_nothing(small):
    report = run_checks(small, CheckArgs())
    args = CheckArgs(on_leakage="error", on_empty="error")
    with pytest.raises(AfinarError) as raised:
        apply_policies(small, report, args)
    message = str(raised.value)
    assert "\n" not in message
    assert "1 empty or whitespace-only train rows (checks.on_empty)" in message
    assert "1 train rows that also occur in test (exact) (checks.on_leakage)" in message
    assert "--set checks.on_empty=drop" in message and report.actions == []


def test_warn_keeps_every_row_and_notes_it(small):
    report = run_checks(small, CheckArgs())
    args = CheckArgs(on_leakage="warn", on_duplicates="warn", on_conflicts="warn", on_empty="warn")
    kept = apply_policies(small, report, args)
    assert kept.train["text"] == small.train["text"]
    assert len(kept.notes) == 5 and all(n.startswith("kept ") and n.endswith("=warn)") for n in kept.notes)
    assert "kept 3 train rows repeating an earlier train text (after normalisation) (checks.on_duplicates=warn)" \
        in kept.notes


def test_a_report_for_other_splits_is_refused(small):
    report = run_checks(small, CheckArgs())
    with pytest.raises(AfinarError, match="10 train rows"):
        apply_policies(Splits(dataset(["one"]), small.validation, small.test, NAMES), report, CheckArgs())


def test_normalise_and_shingles():
    assert normalise("  RT @someone: Look at THIS\n http://t.co/abc  www.x.org/y now ") == "rt : look at this now"
    assert normalise("mail me at a@b.com") == "mail me at a@b.com"  # an address is not a mention
    assert shingles("abc", 5) == {"abc"} and shingles("abcdef", 5) == {"abcde", "bcdef"}


def test_mojibake_and_control_characters_are_flagged():
    texts = ["ï¿½ï¿½ï¿½ hello",  # a replacement character read as cp1252, three times: mostly damage
             "cafÃ© au lait",  # é read as latin-1
             "it was fine â€” really",  # an em dash read as cp1252
             "a bell\x07 and a null\x00 in here",
             "\x01\x02\x03\x04",  # nothing but control characters
             "emoji read wrong ðŸ˜€",
             "plain: ¿Qué tal? Größe, naïve, 😀 — “quoted”",
             "price Â£5",
             "replacement \ufffd char"]
    found = run_checks(Splits(dataset(texts), dataset([]), None, NAMES), CheckArgs()).mojibake["train"]
    assert found.indices == [0, 1, 2, 3, 4, 5, 7, 8]
    assert found.detail["mostly"] == 2  # rows 0 and 4


def test_token_length_profile_with_the_tiny_bert_tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["word " * k for k in (1, 5, 8, 9, 20)]  # k words + [CLS] and [SEP]: 3, 7, 10, 11, 22 tokens
    splits = Splits(dataset(texts), dataset(texts[:2]), None, NAMES)
    report = run_checks(splits, CheckArgs(), tokenizer, max_length=10)
    assert report.lengths["train"] == {"p50": 10, "p95": 22, "max": 22, "truncated": 2}
    assert report.lengths["validation"]["truncated"] == 0
    assert "truncated at 10 tokens" in format_report(report)
    assert run_checks(splits, CheckArgs()).lengths is None


def test_check_loads_the_configured_data_and_tokenizer(tweets_jsonl, tiny_bert):
    train, test = tweets_jsonl
    config = Config(model=ModelArgs(name=str(tiny_bert)), data=DataArgs(source=str(train), test=str(test)))
    report = check(config)
    assert report.rows == {"train": 240, "test": 60}  # the splits as the source has them: nothing carved yet
    assert report.max_length == 128 and report.lengths["train"]["truncated"] == 0
    assert format_report(report).splitlines()[0].split() == ["train", "test"]
    assert "small training set" in format_report(report)  # 240 rows for 3 classes


def test_a_large_training_set_gets_no_small_data_advice(small):
    report = run_checks(small, CheckArgs())
    assert "smallest class" in small_data_advice(report)
    report.rows["train"], report.balance["train"]["counts"] = 900, {"a": 300, "b": 300, "c": 300}
    assert small_data_advice(report) is None and "small training set" not in format_report(report)


def test_imbalance_is_reported_with_what_to_do(small):
    report = run_checks(small, CheckArgs())
    report.balance["train"]["counts"] = {"a": 400, "b": 300, "c": 30}
    assert "class_weights=balanced" in format_report(report) and "'c' has 30" in imbalance_advice(report)
    report.balance["train"]["counts"] = {"a": 400, "b": 300, "c": 41}
    assert imbalance_advice(report) is None
