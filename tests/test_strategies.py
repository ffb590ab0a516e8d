"""The bake-off: encoder strategies on separable data, the recommendation rule, and `compare` end to end."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_overrides, tweet_rows

from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.data.sources import Splits, _to_dataset
from afinar.experiments.compare import (
    CompareArgs,
    KnnRetrieval,
    LinearProbe,
    NeighbourIndex,
    StrategyResult,
    compare,
    parse_strategies,
    recommend,
    run_strategy,
)
from afinar.experiments.prompting import PromptArgs
from afinar.inference.encoder import Encoder
from afinar.reporting.pages import comparison_rows

LABELS = ["negative", "neutral", "positive"]
TEMPLATES = ["awful terrible horrible sad day number {}", "the train leaves the station at {}",
             "lovely wonderful happy great time number {}"]


def separable_splits() -> Splits:
    """Near-copies per class (only a number changes), so the nearest train text always has the right label."""
    def split(numbers):
        rows = [(TEMPLATES[c].format(i), c) for i in numbers for c in range(3)]
        return _to_dataset(pd.DataFrame(rows, columns=["text", "label"]), LABELS)

    return Splits(split(range(0, 12)), split(range(12, 16)), split(range(16, 22)), LABELS)


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder(str(tiny_bert), max_length=32)


def test_encoder_embeddings_are_unit_length_and_order_independent(encoder):
    texts = ["a much longer text than the others, to be sorted last", "short", "", "mid length text"]
    embeddings = encoder.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(encoder.encode(texts[::-1])[::-1], embeddings, atol=1e-5)


def test_knn_retrieval_on_separable_data_is_exact(encoder):
    splits = separable_splits()
    strategy = KnnRetrieval(encoder, [1, 3])
    strategy.fit(splits)
    assert strategy.k in (1, 3) and strategy.details["index_size"] == 36
    assert (strategy.predict(list(splits.test["text"]))["knn"] == np.asarray(splits.test["label"])).all()


def test_neighbour_search_can_skip_each_text_itself(encoder):
    texts = [TEMPLATES[c].format(i) for c in range(3) for i in range(4)]
    index = NeighbourIndex(encoder, texts)
    _, ids = index.search(texts, 2)
    assert (ids[:, 0] == np.arange(len(texts))).all()  # a text is its own nearest neighbour ...
    _, ids = index.search(texts, 2, exclude=list(range(len(texts))))
    assert ids.shape == (12, 2) and not (ids == np.arange(12)[:, None]).any()  # ... unless excluded
    assert (ids // 4 == np.arange(12)[:, None] // 4).all()  # the rest of its class comes next


def test_linear_probe_on_separable_data_beats_chance_by_far(encoder):
    splits = separable_splits()
    result = run_strategy("linear_probe", load_config(), splits, None, CompareArgs(encoder=str(encoder.name)))
    assert result.test_accuracy >= 0.9 and result.validation["n"] == 12 and result.test["n"] == 18
    assert result.details["C"] in (0.01, 0.1, 1.0, 10.0)
    assert result.trainable_params == 3 * 32 + 3 and result.train_seconds > 0 and result.infer_texts_per_s > 0
    assert result.peak_memory_mb > 0


def test_linear_probe_chooses_c_on_validation_only(encoder, monkeypatch):
    splits = separable_splits()
    probe = LinearProbe(encoder, [0.01, 100.0], seed=0)
    seen = []
    original = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts: seen.append(list(texts)) or original(texts))
    probe.fit(splits)
    assert list(splits.test["text"]) not in seen and list(splits.validation["text"]) in seen


def test_linear_probe_reads_sentence_pairs_and_other_encoders_refuse_them(encoder):
    """Whether the second text is about the same thing as the first: the first text alone says nothing (each
    appears with both labels), so only features of the pair (|u - v|, u * v) can reach high accuracy."""
    def split(numbers):
        rows = []
        for i in numbers:
            for c in range(3):
                rows.append((TEMPLATES[c].format(i), TEMPLATES[c].format(i + 100), "same"))
                rows.append((TEMPLATES[c].format(i), TEMPLATES[(c + 1) % 3].format(i), "different"))
        frame = pd.DataFrame(rows, columns=["text", "text_pair", "label"])
        return _to_dataset(frame.assign(label=frame["label"].map({"different": 0, "same": 1})), ["different", "same"])

    splits = Splits(split(range(0, 12)), split(range(12, 16)), split(range(16, 22)), ["different", "same"])
    result = run_strategy("linear_probe", load_config(), splits, None, CompareArgs(encoder=str(encoder.name)))
    assert result.test_accuracy >= 0.9 and result.test["n"] == 36
    assert result.trainable_params == 4 * 32 + 1  # (u, v, |u - v|, u * v): one logit for two classes
    with pytest.raises(AfinarError, match="sentence pairs: compare linear_probe, lora, full"):
        run_strategy("knn_retrieval", load_config(), splits, None, CompareArgs(encoder=str(encoder.name)))


def result(name, val, seconds, texts_per_s, test=None):
    return StrategyResult(name, "m", validation={"accuracy": val}, test={"accuracy": test or val},
                          train_seconds=seconds, infer_texts_per_s=texts_per_s)


def test_recommend_the_cheapest_within_tolerance_of_the_best_validation_accuracy():
    results = [result("full", 0.80, 600, 200), result("lora", 0.795, 300, 200),
               result("linear_probe", 0.70, 5, 500), result("zero_shot", 0.50, 1, 5, test=0.39)]
    name, text = recommend(results, tolerance_points=1.0, majority=0.40)
    assert name == "lora" and "within 1 point of the best (full: 0.800)" in text
    assert "majority class on test: zero_shot" in text
    name, text = recommend(results, tolerance_points=0.1)
    assert name == "full" and "nothing else comes within" in text
    assert recommend([StrategyResult("x", "", error="boom")], 1.0)[0] is None


def _scored(gold, predicted):
    from afinar.evaluation.metrics import classification_report

    return classification_report(np.asarray(gold), np.asarray(predicted), ["a", "b", "c"])


def test_the_recommendation_compares_the_best_two_paired_on_the_same_rows():
    """Two strategies 1.5 points apart on the same 2,000 rows: their separate 95% intervals overlap (the old
    rule called that noise), the paired interval does not contain 0."""
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 2000)
    b = np.where(rng.random(2000) < 0.70, gold, (gold + 1) % 3)
    a = b.copy()
    a[np.flatnonzero(b != gold)[:30]] = gold[np.flatnonzero(b != gold)[:30]]  # a fixes 30 of b's errors
    close = [StrategyResult("a", "m", validation=_scored(gold, a)), StrategyResult("b", "m", validation=_scored(gold, b))]
    interval_a, interval_b = (r.validation["ci95"]["accuracy"] for r in close)
    assert interval_a[0] <= interval_b[1]  # separate intervals overlap
    text = recommend(close, tolerance_points=0.5)[1]
    assert "a is +1.5 points of accuracy above b" in text and "a difference beyond noise" in text
    same = [close[0], StrategyResult("b", "m", validation=_scored(gold, a))]
    assert "within noise" in recommend(same, tolerance_points=0.5)[1]


def test_the_table_shows_each_strategy_paired_against_the_validation_best():
    from afinar.experiments.compare import _pair_with_best

    rng = np.random.default_rng(1)
    gold = rng.integers(0, 3, 500)
    good = np.where(rng.random(500) < 0.8, gold, (gold + 1) % 3)
    bad = np.where(rng.random(500) < 0.5, gold, (gold + 2) % 3)
    results = [StrategyResult("bad", "m", validation={"accuracy": 0.5}, test=_scored(gold, bad)),
               StrategyResult("good", "m", validation={"accuracy": 0.8}, test=_scored(gold, good)),
               StrategyResult("other_rows", "m", validation={"accuracy": 0.6}, test=_scored(gold[::-1], bad))]
    _pair_with_best(results)
    rows = {row[0]: row for row in comparison_rows([dataclasses.asdict(r) for r in results])}
    gap = results[0].details["paired_vs_best"]["accuracy"]
    assert gap["delta"] == pytest.approx(np.mean(bad == gold) - np.mean(good == gold))
    assert gap["ci95"][1] < 0 and rows["bad"][4].endswith("*") and rows["good"][4] == "best"
    assert rows["other_rows"][4] == "—"  # not the same rows: no paired figure at all


def test_parse_strategies():
    assert parse_strategies("knn_retrieval, lora,knn_retrieval") == ["knn_retrieval", "lora"]
    assert parse_strategies("all")[-6:] == ["setfit", "sft", "lora", "full", "from_scratch", "from_scratch_3x"]
    assert len(parse_strategies("all")) == 11
    with pytest.raises(AfinarError, match="unknown strategy knn"):
        parse_strategies("knn,lora")


def test_compare_writes_the_table_and_the_report(tiny_bert, tiny_gpt2, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.epochs": 1, "train.eval_every": 4, "train.run_name": None}))
    out = tmp_path / "cmp"
    comparison = compare(config, "knn_retrieval,zero_shot,lora", out,
                         CompareArgs(encoder=str(tiny_bert), isolate=False, knn_k=[1, 5]),
                         PromptArgs(model=str(tiny_gpt2), calibration_samples=16, max_text_tokens=24))
    assert [r.name for r in comparison.results] == ["knn_retrieval", "zero_shot", "lora"]
    assert all(r.error is None for r in comparison.results), [r.error for r in comparison.results]
    rows = comparison.rows
    for r in comparison.results:  # the same validation and test rows for every strategy
        assert (r.validation["n"], r.test["n"]) == (rows["validation"], rows["test"]) == (24, 60)
        assert r.infer_texts_per_s > 0 and r.peak_memory_mb > 0
    zero_shot, lora = comparison.results[1], comparison.results[2]
    assert set(zero_shot.variants["raw"]) == {"validation", "test"} and zero_shot.trainable_params == 0
    assert 0 < lora.trainable_params < lora.details["total_parameters"] and lora.train_seconds > 0
    assert comparison.recommended in {"knn_retrieval", "zero_shot", "lora"}
    table = (out / "comparison.md").read_text()
    assert ("| strategy | model | val acc | test acc [95% CI] | vs best, paired [95% CI] | test macro-F1 | train time "
            "| inference texts/s |"
            in table)
    assert re.search(r"\| zero_shot \| .* \| [01]\.\d{3} \(raw [01]\.\d{3}\) \|", table)
    assert "## Recommendation" in table and f"**{comparison.recommended}**" in table
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["recommended"] == comparison.recommended and len(saved["results"]) == 3
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "runs/lora/report.html" in page
    assert (out / "runs" / "lora" / "report.html").is_file() and (out / "data_report.json").is_file()
    with pytest.raises(AfinarError, match="already holds a comparison"):
        compare(config, "knn_retrieval", out)


def test_fine_tuning_strategies_train_in_forced_bf16(tiny_bert, tweets_jsonl, tmp_path):
    """bf16 autocast, forced: the path `auto` takes on CPUs with native bf16, for both fine-tuning strategies."""
    train_file, test_file = tweets_jsonl
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.epochs": 1, "train.run_name": None, "train.precision": "bf16"}))
    comparison = compare(config, "lora,full", tmp_path / "cmp", CompareArgs(encoder=str(tiny_bert), isolate=False))
    assert [r.error for r in comparison.results] == [None, None]
    for result in comparison.results:
        manifest = json.loads((Path(result.details["run_dir"]) / "manifest.json").read_text())
        assert manifest["precision"]["precision"] == "bf16"
        assert result.validation["loss"] > 0 and result.test["n"] == 60


def test_from_scratch_rows_train_random_weights_for_full_s_steps_and_three_times_them(tiny_bert, tweets_jsonl, tmp_path,
                                                                                      one_thread):
    """16 rows at batch 16 are 1 step an epoch; `train.min_steps` 4 makes full's plan 4 epochs, 4 steps: the 1x row
    takes them, the 3x row 12, with no early stopping to end either sooner."""
    train_file, test_file = tweets_jsonl
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.epochs": None, "train.min_steps": 4, "data.max_train_samples": 16, "train.eval_every": 4,
        "train.precision": "fp32", "train.run_name": None}))
    comparison = compare(config, "from_scratch,from_scratch_3x", tmp_path / "cmp",
                         CompareArgs(encoder=str(tiny_bert), isolate=False))
    once, thrice = comparison.results
    assert [once.error, thrice.error] == [None, None]
    assert once.model == thrice.model == f"{tiny_bert} (random init)"
    assert (once.details["steps"], thrice.details["steps"]) == (4, 12)
    assert thrice.details["budget"] == "12 optimizer steps (3x full's plan on these rows); took 12"
    assert "model.from_scratch=true" in once.details["overrides"] and "train.max_steps=12" in thrice.details["overrides"]
    assert once.test["n"] == thrice.test["n"] == 60 and once.trainable_params == once.details["total_parameters"]
    best = max(comparison.results, key=lambda r: r.val_accuracy)
    other = thrice if best is once else once
    assert best.details["paired_vs_best"] == {"against": best.name}
    assert other.details["paired_vs_best"]["against"] == best.name and "ci95" in other.details["paired_vs_best"]["accuracy"]
    assert "| from_scratch_3x |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_isolated_strategies_run_in_their_own_process(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path))
    isolated = compare(config, "knn_retrieval", tmp_path / "cmp", CompareArgs(encoder=str(tiny_bert), isolate=True))
    in_process = compare(config, "knn_retrieval", tmp_path / "cmp2", CompareArgs(encoder=str(tiny_bert), isolate=False))
    a, b = isolated.results[0], in_process.results[0]
    assert a.error is None and 0 < a.base_memory_mb < a.peak_memory_mb and b.base_memory_mb is None
    assert a.test == b.test and a.details["k"] == b.details["k"]  # same splits, same seed, same answers
    assert "that process held" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_cli_compare_reads_the_compare_section_and_report_rewrites(tiny_bert, tweets_jsonl, tmp_path, capsys):
    from afinar import cli

    train_file, test_file = tweets_jsonl
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path) + [
        f"compare.encoder={tiny_bert}", "compare.isolate=false", "knn_k=1,3"]
    args = ["compare", "--strategies", "knn_retrieval", "--out", str(tmp_path / "cmp")]
    assert cli.main(args + [a for o in overrides for a in ("--set", o)]) == 0
    out = capsys.readouterr().out
    assert "| knn_retrieval |" in out and "## Recommendation" in out
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["results"][0]["details"]["k"] in (1, 3)
    (tmp_path / "cmp" / "report.html").unlink()
    assert cli.main(["report", str(tmp_path / "cmp")]) == 0 and (tmp_path / "cmp" / "report.html").is_file()
    assert cli.main(["compare", "--strategies", "knn", "--out", str(tmp_path / "x")]) == 2
    assert "unknown strategy knn" in capsys.readouterr().err


def test_resume_reruns_only_failed_strategies(tiny_bert, tweets_jsonl, tmp_path, monkeypatch):
    from afinar.experiments import compare as strategies

    train_file, test_file = tweets_jsonl
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path))
    args = CompareArgs(encoder=str(tiny_bert), isolate=False, knn_k=[1, 3], probe_c=[1.0])
    out = tmp_path / "cmp"

    def broken(self, splits):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(strategies.LinearProbe, "fit", broken)
        first = compare(config, "knn_retrieval,linear_probe", out, args)
    assert first.results[1].error == "RuntimeError: killed" and first.results[0].error is None
    with pytest.raises(AfinarError, match="holds a comparison; pick another --out, or --resume"):
        compare(config, "knn_retrieval,linear_probe", out, args)
    other = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{"train.seed": 1}))
    with pytest.raises(AfinarError, match="another configuration"):
        compare(other, "knn_retrieval,linear_probe", out, args, resume=True)
    monkeypatch.setattr(strategies.KnnRetrieval, "fit", broken)  # a finished strategy is not run again
    resumed = compare(config, "knn_retrieval,linear_probe", out, args, resume=True)
    assert [r.error for r in resumed.results] == [None, None]
    assert resumed.results[0].test == first.results[0].test and resumed.results[1].test["n"] == 60
    assert json.loads((out / "comparison.json").read_text())["results"][1]["details"]["C"] == 1.0


@pytest.mark.slow  # 26 s: `make test` stays under 10 minutes with the new tasks' end-to-end tests
def test_setfit_few_shot_fine_tuning_learns_from_48_real_tweets(tmp_path):
    """16 tweets per class and 320 contrastive pairs lift the packaged MiniLM well above the majority class."""
    rows = tweet_rows("train", 400)
    train = [r for c in range(3) for r in [r for r in rows if r["label"] == c][:16]]
    held_out = tweet_rows("test", 300)

    def dataset(items):
        return _to_dataset(pd.DataFrame([(r["text"], r["label"]) for r in items], columns=["text", "label"]), LABELS)

    splits = Splits(dataset(train), dataset(held_out[:60]), dataset(held_out[60:]), LABELS)
    args = CompareArgs(setfit_max_pairs=320)
    result = run_strategy("setfit", load_config(overrides=["data.max_length=64"]), splits, tmp_path, args)
    majority = np.bincount([r["label"] for r in held_out[60:]]).max() / 240
    assert result.test_accuracy >= majority + 0.05, (result.test_accuracy, majority)
    assert result.details["pairs"] == 320 and result.details["package"] == "setfit"
    assert result.trainable_params > 22_000_000  # the whole encoder is tuned, then the head


def test_strategies_that_cannot_be_paired_are_said_so_and_warnings_are_shown(tmp_path):
    from afinar.experiments.compare import ComparisonResult, markdown

    old = [StrategyResult("a", "m", validation={"accuracy": 0.70}), StrategyResult("b", "m", validation={"accuracy": 0.69})]
    assert "no paired comparison says whether their 1.0-point gap is noise" in recommend(old, 0.5)[1]
    old[1].details["warning"] = "prompts that could not fit data.max_length were skipped, not scored: 3 test rows"
    table = markdown(ComparisonResult(tmp_path, old, "a", "x", {"train": 1}, LABELS, {}, "m"))
    assert "- b: prompts that could not fit data.max_length were skipped" in table
