"""Suspect labels: a planted-noise check on real tweets with the packaged encoder, and the CSV a user fixes from."""

import csv
import html
import json

import numpy as np
from conftest import SHARED, tiny_overrides, tweet_rows

from afinar import cli
from afinar.api import train
from afinar.core.config import load_config
from afinar.evaluation.suspects import out_of_fold_probabilities, rank_suspects


def test_flipped_labels_rise_to_the_top_of_the_suspects(tmp_path, capsys):
    """5% of 2,000 real tweets get a wrong label at random; chance puts 10 of the 100 flipped rows among the top
    200 suspects. Frozen MiniLM features + logistic regression found 49 here (42-50 for other flip seeds), so this
    guards the level reached (4x chance). The fine-tuned run's ranking, too slow for this suite, meets the issue's
    bar of 50 (`bench/planted_noise.py`: 55, 50, 62 for flip seeds 0-2)."""
    rows = tweet_rows("train", 2000)
    rng = np.random.default_rng(0)
    flipped = set(rng.choice(len(rows), 100, replace=False).tolist())
    for i in flipped:
        rows[i] = {**rows[i], "label": int((rows[i]["label"] + rng.integers(1, 3)) % 3)}
    path = tmp_path / "noisy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "suspects.csv"
    assert cli.main(["check", "--data", str(path), "--suspects", str(out)]) == 0
    with out.open(encoding="utf-8") as handle:
        ranked = list(csv.DictReader(handle))
    assert list(ranked[0]) == ["row", "text", "given_label", "suggested_label", "confidence",
                               "given_label_probability"]
    found = len(flipped & {int(r["row"]) for r in ranked[:200]})
    print(f"flipped rows in the top 200 suspects: {found} of 100")
    assert found >= 40, found
    assert ranked[0]["text"] == rows[int(ranked[0]["row"])]["text"]  # the row number points into the file
    assert "every row, ranked" in capsys.readouterr().out


def test_suspects_of_sentence_pairs_name_both_texts(tmp_path):
    """RTE pairs are ranked from features of the pair; the CSV keeps both texts of each row."""
    import pandas as pd

    frame = pd.read_csv(SHARED / "rte" / "train.tsv", sep="\t", quoting=3, dtype=str).iloc[:120]
    path, out = tmp_path / "pairs.csv", tmp_path / "suspects.csv"
    frame.to_csv(path, index=False)
    assert cli.main(["check", "--data", str(path), "--suspects", str(out)]) == 0
    with out.open(encoding="utf-8") as handle:
        first = next(csv.DictReader(handle))
    row = frame.iloc[int(first["row"])]
    assert (first["text"], first["text_pair"], first["given_label"]) == (row["sentence1"], row["sentence2"],
                                                                           row["label"])


def test_ranking_puts_the_least_probable_given_label_first():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    ranked = rank_suspects(["a", "b", "c", "d"], np.array([0, 0, 1, 0]), probabilities, ["x", "y"])
    assert [s.row for s in ranked] == [1, 2, 3, 0]  # p(given): 0.2, 0.4, 0.45, then row 0 (agrees, 0.9)
    assert ranked[0].suggested == "y" and ranked[0].confidence == 0.8


def test_out_of_fold_probabilities_never_see_their_own_row():
    features = np.eye(10)  # each row only resembles itself: a model that saw it would be sure
    labels = np.array([0, 1] * 5)
    probabilities = out_of_fold_probabilities(features, labels, folds=5, seed=0)
    assert probabilities.shape == (10, 2) and (probabilities[np.arange(10), labels] < 0.75).all()


def test_a_trained_classifier_ranks_its_training_rows_and_the_report_shows_them(tiny_bert, tweets_jsonl, tmp_path):
    """After training, every training row is in suspects.csv, least probable given label first, its row number
    pointing at the line of the train file (validation was carved from that file); the report shows the rows the
    model disagrees with."""
    train_file, test_file = tweets_jsonl
    result = train(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path)))
    lines = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines()]
    with (result.run_dir / "suspects.csv").open(encoding="utf-8") as handle:
        ranked = list(csv.DictReader(handle))
    summary = result.metrics["suspects"]
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert summary["scored"] == len(ranked) == manifest["data"]["rows"]["train"]
    names = ["negative", "neutral", "positive"]
    for suspect in ranked:
        line = lines[int(suspect["row"])]
        assert suspect["text"] == line["text"] and suspect["given_label"] == names[line["label"]]
    given = [float(s["given_label_probability"]) for s in ranked]
    assert given == sorted(given)
    disagree = [s for s in ranked if s["suggested_label"] != s["given_label"]]
    assert summary["disagree"] == len(disagree) > 0
    report = (result.run_dir / "report.html").read_text(encoding="utf-8")
    assert "Suspect labels" in report and html.escape(disagree[0]["text"][:40]) in report

    off = train(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path,
                                                     **{"train.run_name": "off", "checks.suspects": False})))
    assert "suspects" not in off.metrics and not (off.run_dir / "suspects.csv").exists()
