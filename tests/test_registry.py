"""The task registry: a task defined here, outside the package, trains, evaluates, predicts, serves, reports and
describes itself on its model card through the public entry points, with no change to afinar."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tweet_rows
from fastapi.testclient import TestClient
from huggingface_hub import ModelCard

import afinar
from afinar import cli
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.inference.predictors import load_predictor
from afinar.serving.app import create_app
from afinar.tasks import registry
from afinar.training.lifecycle import TaskData

LONG = 60  # characters: a text longer than this is "long"


def length_label(text: str) -> int:
    return int(len(text) > LONG)


class LengthBucket(afinar.Task):
    """A toy task: is a text longer than 60 characters? Its labels come from the texts themselves."""

    name = "toy_length"
    lora_task_type = "SEQ_CLS"
    pipeline_tag = "text-classification"
    card_metrics = ("accuracy",)
    labels = ["short", "long"]

    def configure(self, config):
        config.train.metric_for_best_model = "loss"  # no compute_metrics during training
        return ["train.metric_for_best_model = loss (the toy task scores accuracy at the end)"]

    def _texts(self, path: str) -> list[str]:
        return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines()]

    def _tokenized(self, tokenizer, texts: list[str], max_length: int):
        from datasets import Dataset

        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        return Dataset.from_dict({**encoded, "labels": [length_label(t) for t in texts]})

    def prepare(self, config, model_path, tokenizer, with_test):
        texts = self._texts(config.data.source)
        cut = len(texts) * 4 // 5
        test = self._texts(config.data.test) if with_test else None
        datasets = [self._tokenized(tokenizer, part, config.data.max_length) if part is not None else None
                    for part in (texts[:cut], texts[cut:], test)]
        return TaskData(*datasets, manifest={"data": {"sources": {"train": config.data.source}}})

    def load_model(self, config, model_path, tokenizer, data):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=2, id2label=dict(enumerate(self.labels)),
            label2id={n: i for i, n in enumerate(self.labels)}, use_safetensors=True)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def score(self, trainer, data):
        scores = {}
        for split, ds in (("validation", data.validation), ("test", data.test)):
            if ds is not None:
                output = trainer.predict(ds)
                predicted = np.asarray(output.predictions).argmax(axis=1)
                scores[split] = {"accuracy": float((predicted == np.asarray(output.label_ids)).mean()),
                                 "loss": float(output.metrics["test_loss"]), "n": len(ds)}
        return scores

    def result_lines(self, metrics):
        return [f"toy {split} accuracy {metrics[split]['accuracy']:.4f}" for split in ("validation", "test")]

    def report_sections(self, run, metrics):
        return [f"<h2>Length buckets</h2><p>long means more than {LONG} characters</p>"]

    def card_usage(self, run):
        return "Toy usage: any text in, short or long out."

    def load_predictor(self, run, backend="auto"):
        return load_predictor(run.path, "torch")

    def evaluate(self, run, data, backend, batch_size):
        texts = self._texts(data or run.config().data.test)
        predicted = self.load_predictor(run).scores(texts, batch_size).argmax(axis=1)
        return {"accuracy": float((predicted == [length_label(t) for t in texts]).mean()), "n": len(texts)}


@pytest.fixture(scope="module")
def toy_run(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    for split, n in (("train", 160), ("test", 40)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tweet_rows(split, n)),
                                               encoding="utf-8")
    afinar.register_task(LengthBucket())
    config = load_config(overrides=[f"task={LengthBucket.name}", f"model.name={tiny_bert}",
                                    f"data.source={folder / 'train.jsonl'}", f"data.test={folder / 'test.jsonl'}",
                                    f"train.output_dir={folder}", "train.run_name=toy", "train.max_steps=6",
                                    "train.batch_size=16", "data.max_length=48"])
    yield afinar.train(config)
    registry._registered.pop(LengthBucket.name)


def test_a_task_defined_outside_the_package_runs_end_to_end(toy_run, capsys):
    assert toy_run.task == "toy_length" and set(toy_run.metrics) >= {"validation", "test", "train"}
    run = Run.open(toy_run.run_dir)
    assert run.manifest()["task"] == "toy_length" and run.status() == "finished"
    # evaluate and predict through the public API: the task's own scoring and predictor
    scored = afinar.evaluate(toy_run.run_dir)
    assert scored == {"accuracy": pytest.approx(toy_run.metrics["test"]["accuracy"], abs=1e-6), "n": 40}
    assert cli.main(["evaluate", str(toy_run.run_dir)]) == 0  # printed as the task says
    assert capsys.readouterr().out.splitlines() == [f"accuracy: {scored['accuracy']:.4f}", "n: 40"]
    [prediction] = afinar.predict(toy_run.run_dir, ["hi"])
    assert prediction.label in LengthBucket.labels and set(prediction.scores) == set(LengthBucket.labels)
    # served: /predict answers with the task's labels
    with TestClient(create_app(toy_run.run_dir, batch_wait_ms=0)) as client:
        answer = client.post("/predict", json={"texts": ["hi", "a much longer text " * 5]})
    assert answer.status_code == 200
    assert [p["label"] for p in answer.json()["predictions"]] == [p.label for p in
                                                                 afinar.predict(toy_run.run_dir, ["hi", "a much longer text " * 5])]
    # the report and the model card carry the task's own sections
    assert "<h2>Length buckets</h2>" in afinar.report(toy_run.run_dir).read_text(encoding="utf-8")
    card = ModelCard.load(toy_run.run_dir / "model" / "README.md")
    assert card.data.pipeline_tag == "text-classification" and "Toy usage: any text in" in card.text
    assert card.data.to_dict()["tags"] == ["afinar", "toy_length"]


def test_a_command_the_task_does_not_support_is_a_one_line_error(toy_run, capsys):
    with pytest.raises(AfinarError, match="afinar export does not apply to task 'toy_length'"):
        afinar.export(toy_run.run_dir)
    assert cli.main(["forgetting", str(toy_run.run_dir)]) == 2
    assert capsys.readouterr().err.strip() == \
        "afinar: error: afinar forgetting does not apply to task 'toy_length'"


def test_an_unknown_task_names_the_known_ones(tmp_path, capsys):
    assert cli.main(["check", "--set", "task=summarise", "--set", f"train.output_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert ("task 'summarise' is not known; use one of causal_lm, classification, multilabel, preference, "
            "question_answering, sft, "
            "token_classification") in error


def test_only_the_registry_reads_a_task_name():
    """Every other module asks the task (`registry.for_run(run).load_predictor(...)`), so a new task needs no
    branch elsewhere: `grep -rnE "task *(==|!=|in) "` finds the registry alone."""
    import re

    package = Path(afinar.__file__).parent
    branching = re.compile(r"task *(==|!=|in) |\.task *(==|!=|in) ")
    found = {path.relative_to(package).as_posix() for path in package.rglob("*.py")
             if branching.search(path.read_text(encoding="utf-8"))}
    assert found == {"tasks/registry.py"}
