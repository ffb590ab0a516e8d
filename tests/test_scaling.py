"""Defaults that scale with the data: a small training set still learns and is evaluated often enough, every
choice lands in the run's resolved config, and a value the user set always wins."""

import json
import logging

import yaml
from conftest import tiny_overrides

import afinar
from afinar.core.config import load_config
from afinar.core.runs import Run
from afinar.training.scaling import EVALUATIONS_PER_RUN, planned_steps, scale_to_data


def test_a_small_training_set_gets_enough_steps_and_evaluations():
    config = load_config(overrides=["train.batch_size=32"])
    notes = scale_to_data(config, rows=500, lora_task_type="SEQ_CLS")
    # 500 rows are 16 steps per epoch: 3 epochs (48 steps) fall short of min_steps=300, so 19 epochs (304 steps)
    assert config.train.epochs == 19 and planned_steps(500, config.train) == 304
    assert config.train.eval_every == 38 and 304 // config.train.eval_every >= 5
    assert config.train.learning_rate == 5e-5
    assert any("train.epochs = 19" in n and "min_steps" in n for n in notes)


def test_a_large_training_set_keeps_the_default_epochs():
    config = load_config()
    scale_to_data(config, rows=24_574, lora_task_type="SEQ_CLS")
    assert config.train.epochs == 3 and config.train.eval_every == 288  # 768 steps per epoch x 3 / 8


def test_lora_gets_an_adapter_learning_rate_per_task():
    classifier = load_config(overrides=["lora.enabled=true"])
    scale_to_data(classifier, 1000, "SEQ_CLS")
    language_model = load_config(overrides=["lora.enabled=true"])
    scale_to_data(language_model, 1000, "CAUSAL_LM")
    assert classifier.train.learning_rate == 1e-3 and language_model.train.learning_rate == 2e-4


def test_values_the_user_set_win(caplog):
    config = load_config(overrides=["train.epochs=2", "train.learning_rate=1e-4", "train.eval_every=200",
                                    "lora.enabled=true"])
    with caplog.at_level(logging.WARNING, logger="afinar"):
        notes = scale_to_data(config, rows=500, lora_task_type="SEQ_CLS")
    assert (config.train.epochs, config.train.learning_rate, config.train.eval_every) == (2, 1e-4, 200)
    # but a cadence that cannot evaluate during a 32-step run is said out loud
    assert notes == [n for n in notes if "eval_every = 200 (set)" in n] and "too few" in caplog.text


def test_steps_are_counted_as_trainer_counts_them():
    """A last, partial accumulation still steps (`Trainer` ceils), and the batch is global under torchrun: the
    plan once floored the first and divided by the process count twice."""
    from afinar.training.scaling import steps_per_epoch

    args = load_config(overrides=["train.batch_size=10", "train.gradient_accumulation_steps=3"]).train
    assert steps_per_epoch(100, args) == 4  # 10 batches: 3 + 3 + 3 + 1
    assert steps_per_epoch(95, args) == 4 and steps_per_epoch(90, args) == 3


def test_max_steps_is_not_stretched():
    config = load_config(overrides=["train.max_steps=40"])
    scale_to_data(config, rows=100, lora_task_type="SEQ_CLS")
    assert planned_steps(100, config.train) == 40 and config.train.eval_every == 5


def test_the_run_records_what_was_chosen(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.epochs": None, "train.learning_rate": None, "train.min_steps": 30})
    result = afinar.train(load_config(overrides=overrides))
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["train"]
    # 216 train rows at batch 16 are 14 steps per epoch: 3 epochs reach min_steps=30
    assert (saved["epochs"], saved["learning_rate"], saved["eval_every"]) == (3, 5e-5, 6)
    notes = json.loads((result.run_dir / "manifest.json").read_text())["notes"]
    assert any(n.startswith("train.eval_every = 6 (unset)") for n in notes)
    evaluations = [e for e in Run(result.run_dir).read_log() if "eval_loss" in e]
    assert len(evaluations) >= EVALUATIONS_PER_RUN - 1
    # the resolved config repeats the run exactly: nothing is left to choose
    again = load_config(result.run_dir / "config.yaml")
    assert scale_to_data(again, 216, "SEQ_CLS") == []
