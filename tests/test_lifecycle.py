"""The run lifecycle every task shares: hub data offline, one LoRA/freeze order, the caller's config untouched,
run folders that cannot be confused, resumed or overwritten by mistake, the export checked on training's rows."""

import csv
import json
import time
from pathlib import Path

import pytest
from conftest import SHARED, tiny_overrides, tweet_rows
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

import afinar
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.inference.export import export_run
from afinar.training import cpu_speed
from afinar.training.trainer import adapt_model

MEDICAL = SHARED / "medical_abstracts"


@pytest.fixture
def stub_hub(monkeypatch):
    """`datasets.load_dataset` answering from local data, so the real hub branch runs end to end offline."""
    calls = []

    def install(dataset: DatasetDict):
        def load_dataset(name, *args, **kwargs):
            calls.append(name)
            return dataset

        monkeypatch.setattr("datasets.load_dataset", load_dataset)
        return calls

    return install


def test_classification_trains_on_a_hub_dataset(stub_hub, tiny_bert, tmp_path):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "neutral", "positive"])})
    splits = {split: Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in tweet_rows(split, n)],
                                       features=features) for split, n in (("train", 200), ("test", 40))}
    calls = stub_hub(DatasetDict(splits))
    result = afinar.train(load_config(overrides=tiny_overrides(tiny_bert, "mteb/tweet_sentiment_extraction", "",
                                                               tmp_path, **{"data.test": None, "train.epochs": 1})))
    assert calls == ["mteb/tweet_sentiment_extraction"]
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data"]["sources"]["train"] == "hub:mteb/tweet_sentiment_extraction"
    assert manifest["data"]["labels"] == ["negative", "neutral", "positive"] and result.metrics["test"]["n"] == 40
    with (result.run_dir / "suspects.csv").open(encoding="utf-8") as handle:
        suspects = list(csv.DictReader(handle))
    assert suspects and {s["row"] for s in suspects} == {""}  # no local file: the text names the hub's row


def test_causal_lm_trains_on_a_hub_dataset(stub_hub, tiny_gpt2, tmp_path):
    documents = {split: MEDICAL.joinpath(f"corpus_{split}.txt").read_text(encoding="utf-8").splitlines()[:n]
                 for split, n in (("train", 40), ("valid", 8))}
    calls = stub_hub(DatasetDict({"train": Dataset.from_dict({"text": documents["train"]}),
                                  "validation": Dataset.from_dict({"text": documents["valid"]})}))
    result = afinar.train(load_config(overrides=[
        "task=causal_lm", f"model={tiny_gpt2}", "data=someone/medical-abstracts", f"train.output_dir={tmp_path}",
        "train.max_steps=4", "train.batch_size=4", "lm.block_size=32", "lm.stride=32", "lm.max_eval_tokens=128",
        "train.early_stopping_patience=none"]))
    assert calls == ["someone/medical-abstracts"]
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data"]["documents"] == {"train": 40, "validation": 8}
    assert manifest["data"]["sources"]["train"] == "hub:someone/medical-abstracts"
    assert result.task == "causal_lm" and result.metrics["validation"]["perplexity"] > 0


def trainable_block_parameters(model) -> set[str]:
    """Trainable parameter names inside the transformer blocks, from `h.<n>.` on (heads and wrappers aside)."""
    return {name[name.index(".h.") + 1:] for name, p in model.named_parameters() if p.requires_grad and ".h." in name}


def test_lora_then_freeze_trains_the_same_set_in_both_tasks(tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = load_config(overrides=["lora.enabled=true", "train.freeze_layers=1"])
    classifier = adapt_model(AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=3), config,
                             "SEQ_CLS")
    lm = adapt_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2), config, "CAUSAL_LM")
    trained = trainable_block_parameters(classifier)
    assert trained == trainable_block_parameters(lm)
    assert trained and all(name.startswith("h.1.") and "lora_" in name for name in trained)  # block 0: nothing


def test_training_twice_with_one_config_object_makes_two_runs(tiny_bert, tweets_jsonl, tmp_path, monkeypatch):
    """The caller's config is not changed, and generated run names never collide, even within one second."""
    train_file, test_file = tweets_jsonl
    monkeypatch.chdir(tmp_path)
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, "runs-here", **{
        "train.run_name": None, "train.max_steps": 2}))
    before = json.dumps(config.__dict__, default=str)
    first, second = afinar.train(config), afinar.train(config)
    assert first.run_dir != second.run_dir and json.dumps(config.__dict__, default=str) == before
    assert config.train.run_name is None and config.train.output_dir == "runs-here"
    started = time.strftime("%Y%m%d-%H%M%S")
    names = {Run.create(load_config(overrides=[f"train.output_dir={tmp_path}"])).path.name for _ in range(3)}
    assert len(names) == 3 and all(name.startswith(started[:8]) for name in names)


def test_relative_output_dir_is_saved_absolute(tiny_bert, tweets_jsonl, tmp_path, monkeypatch):
    train_file, test_file = tweets_jsonl
    monkeypatch.chdir(tmp_path)
    run = Run.create(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, "out")))
    saved = load_config(run.path / "config.yaml")
    assert Path(saved.train.output_dir) == tmp_path / "out" and Path(saved.train.output_dir).is_absolute()


def test_resume_with_other_settings_is_refused_naming_them(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{"train.eval_every": 4,
                                                                              "lora.enabled": False})
    run = Run.create(load_config(overrides=overrides))  # a run that was started (settings resolved), then killed
    edited = load_config(run.path / "config.yaml", ["train.learning_rate=0.0123", "train.resume=true"])
    with pytest.raises(AfinarError, match=r"started with other settings \(train.learning_rate: 0.001 -> 0.0123\)"):
        afinar.train(edited)
    assert load_config(run.path / "config.yaml").train.learning_rate == 1e-3  # the record is untouched


def test_resume_after_editing_the_runs_own_config_yaml_is_refused(tiny_bert, tweets_jsonl, tmp_path):
    """`afinar train <run>/config.yaml --resume` reads the very file a user may edit: the run's record of what it
    started with lives in its manifest, so an edited learning rate is refused, not trained with halfway."""
    import yaml

    train_file, test_file = tweets_jsonl
    resolved = {"train.eval_every": 4, "lora.enabled": False}  # as the lifecycle resolves them before Run.create
    run = Run.create(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **resolved)))
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    saved["train"]["learning_rate"] = 0.0123
    (run.path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(AfinarError, match=r"started with other settings \(train.learning_rate: 0.001 -> 0.0123\)"):
        afinar.train(load_config(run.path / "config.yaml", ["train.resume=true"]))
    assert run.manifest()["started_with"]["settings"]["train.learning_rate"] == 1e-3


def test_resume_into_a_folder_that_is_not_a_run_leaves_it_alone(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    folder = tmp_path / "r"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "precious.txt").write_text("mine")
    with pytest.raises(AfinarError, match="not an afinar run folder"):
        afinar.train(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path) +
                                 ["train.resume=true"]))
    assert (folder / "checkpoints" / "precious.txt").read_text() == "mine" and not (folder / "config.yaml").exists()


def test_cpu_speedups_are_undone_to_stock_modules(tiny_gpt2):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=3)
    stock = [(name, type(module)) for name, module in model.named_modules()]
    assert cpu_speed.apply(model)
    assert [(name, type(module)) for name, module in model.named_modules()] != stock
    cpu_speed.restore(model)
    assert [(name, type(module)) for name, module in model.named_modules()] == stock
    assert model.config._attn_implementation == "sdpa"


def test_export_is_checked_on_the_validation_rows_training_used(tiny_bert, tmp_path):
    """Train rows that leak into test are dropped before validation is carved: reading the files again without
    the checks would carve other rows, some of them trained on."""
    train_rows, test_rows = tweet_rows("train", 200), tweet_rows("test", 40)
    train_rows += test_rows[:30]  # leaked: the checks drop these from train
    for name, rows in (("train", train_rows), ("test", test_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = afinar.train(load_config(overrides=tiny_overrides(tiny_bert, tmp_path / "train.jsonl",
                                                               tmp_path / "test.jsonl", tmp_path / "runs", **{
                                                                   "train.max_steps": 2})))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data"]["rows"]["train"] < 230 - 23  # the leaked rows went before carving
    from afinar.data.cache import dataset_digest
    from afinar.data.sources import load_splits

    unchecked = load_splits(load_config(result.run_dir / "config.yaml").data, 42).validation
    assert dataset_digest(unchecked) != manifest["data"]["digests"]["validation"]  # what the old check used
    record = export_run(result.run_dir, check_texts=1000)
    assert record["check"]["texts"] == manifest["data"]["rows"]["validation"]
    manifest["data"]["digests"]["validation"] = "0" * 64  # the data changed since training: refuse
    (result.run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AfinarError, match="differ from the ones it was trained with"):
        export_run(result.run_dir)


@pytest.mark.parametrize("platform, maxrss", [("linux", 2**20), ("darwin", 2**30)])
def test_peak_memory_is_in_megabytes_on_linux_and_macos(monkeypatch, platform, maxrss):
    """`ru_maxrss` is KiB on Linux and bytes on macOS: 1 GiB either way, not 1,024 GB on a Mac."""
    import resource
    import sys

    from afinar.core.runs import peak_memory

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: type("Usage", (), {"ru_maxrss": maxrss})())
    assert peak_memory()["peak_host_memory_mb"] == 1024.0
