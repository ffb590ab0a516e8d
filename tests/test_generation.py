"""One generation path: what a model was trained to see is saved with it, and `afinar generate`, both OpenAI
endpoints and training put the very same prompt tokens before an answer; the CLI and the server sample the same
text for a prompt and seed."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import LABELS, tweet_rows
from fastapi.testclient import TestClient

import afinar
from afinar import cli
from afinar.core.config import ModelArgs, load_config
from afinar.core.models import load_tokenizer
from afinar.core.runs import Run
from afinar.data import chat
from afinar.inference.generation import FORMAT_FILE, GenerationFormat, Generator
from afinar.serving.app import create_app
from afinar.tasks.sft import checked_conversations

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "You label the sentiment of tweets."
TEMPLATE = "Sentiment of this tweet ({labels}): {text}"


def _overrides(**sets) -> list[str]:
    return [f"{key}={value}" for key, value in {"train.run_name": "r", "train.max_steps": 4, "train.eval_every": 4,
                                                 "train.logging_steps": 2, "train.batch_size": 8,
                                                 "train.learning_rate": 3e-3, "train.precision": "fp32",
                                                 "train.early_stopping_patience": None, "lm.max_eval_tokens": 256,
                                                 "lm.block_size": 32, "lm.stride": 32, **sets}.items()]


@pytest.fixture
def prompt_ids_seen(monkeypatch) -> list[list[int]]:
    """The prompt ids of every request the generator decodes, from any caller (api, CLI, server)."""
    seen: list[list[int]] = []
    original = Generator.sequence

    def recording(self, prompt_ids, *args, **kwargs):
        seen.append(list(prompt_ids))
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(Generator, "sequence", recording)
    return seen


def _post(client: TestClient, path: str, **body) -> dict:
    response = client.post(path, json={"model": "r", "max_tokens": 2, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_an_sft_run_sees_its_training_prompt_tokens_in_generate_and_both_endpoints(tiny_gpt2, tmp_path, capsys,
                                                                                    prompt_ids_seen, monkeypatch):
    monkeypatch.delenv("AFINAR_SERVE_TOKEN", raising=False)
    data = tmp_path / "tweets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tweet_rows("train", 120)), encoding="utf-8")
    config = load_config(overrides=_overrides(**{
        "task": "sft", "model": str(tiny_gpt2), "data.source": str(data), "train.output_dir": str(tmp_path),
        "data.max_length": 96, "sft.system": SYSTEM, "sft.template": TEMPLATE, "sft.validity_samples": 2,
        "sft.generation_samples": 1, "sft.max_new_tokens": 2}))
    run = afinar.train(config).run_dir
    saved = json.loads((run / "model" / FORMAT_FILE).read_text())
    assert saved == {"chat": True, "system": SYSTEM, "template": TEMPLATE, "labels": LABELS, "bos": False,
                     "eos_token": "<|endoftext|>"}

    # the training row: its tokens before the answer, as `chat.encode` rendered them for the loss
    config = Run.open(run).config()  # resolved, as the run trained
    tokenizer = load_tokenizer(config.model)
    checked = checked_conversations(config, tokenizer)  # gives the tokenizer the chat template training used
    assert checked.stats["train"]["dropped_empty_answer"] == 0  # so row 0 of the tokens is row 0 of the texts
    row = checked.datasets["train"][0]
    trained = row["input_ids"][:next(i for i, label in enumerate(row["labels"]) if label != chat.IGNORE)]
    text, messages = checked.splits.train["text"][0], json.loads(checked.splits.train["messages"][0])
    assert messages[0] == {"role": "system", "content": SYSTEM} and text in messages[1]["content"]

    prompt_ids_seen.clear()  # those of the in-run checks
    assert cli.main(["generate", str(run), text, "--max-new-tokens", "2", "--temperature", "0"]) == 0
    capsys.readouterr()
    with TestClient(create_app(run)) as client:
        _post(client, "/v1/completions", prompt=text)
        _post(client, "/v1/chat/completions", messages=[messages[1]])  # the user turn, no system message
        _post(client, "/v1/chat/completions", messages=[{"role": "system", "content": "Be terse."}, messages[1]])
    cli_ids, completion_ids, chat_ids, own_system_ids = prompt_ids_seen
    assert cli_ids == completion_ids == chat_ids == trained
    decoded = tokenizer.decode(own_system_ids)
    assert decoded.startswith("Be terse.") and SYSTEM not in decoded  # a client's own system message wins


@pytest.fixture
def bos_gpt2(tiny_gpt2, tmp_path):
    """The tiny GPT-2 whose tokenizer adds BOS (`<|endoftext|>`) before every text, as Llama's do."""
    from transformers import AutoTokenizer

    folder = tmp_path / "bos-gpt2"
    shutil.copytree(tiny_gpt2, folder)
    AutoTokenizer.from_pretrained(tiny_gpt2, add_bos_token=True).save_pretrained(folder)
    return folder


def test_cli_and_server_sample_the_same_text_for_a_prompt_and_seed_with_a_bos_tokenizer(bos_gpt2, tmp_path, capsys,
                                                                                        prompt_ids_seen, monkeypatch):
    monkeypatch.delenv("AFINAR_SERVE_TOKEN", raising=False)
    lines = [f"Case {i}. The patient presented with fever and a dry cough for {i} days." for i in range(48)]
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    valid.write_text("\n".join(lines[40:]) + "\n", encoding="utf-8")
    run = afinar.train(load_config(overrides=_overrides(**{
        "task": "causal_lm", "model": str(bos_gpt2), "data.source": str(train), "data.validation": str(valid),
        "train.output_dir": str(tmp_path / "runs"), "checks.on_leakage": "warn"}))).run_dir
    assert GenerationFormat.load(run / "model") == GenerationFormat(bos=False, eos_token="<|endoftext|>")

    prompt = "The patient presented with"
    capsys.readouterr()  # what training printed
    assert cli.main(["generate", str(run), prompt, "--max-new-tokens", "8", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    with TestClient(create_app(run)) as client:  # sampling defaults: the CLI's
        response = client.post("/v1/completions", json={"model": "r", "prompt": prompt, "max_tokens": 8, "seed": 3})
    assert response.status_code == 200, response.text
    served = response.json()["choices"][0]["text"]
    assert printed == prompt + served + "\n"
    model = ModelArgs(name=str(run / "model"))
    tokenizer = load_tokenizer(model)
    assert tokenizer(prompt)["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds BOS by itself
    without_bos = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert prompt_ids_seen == [without_bos, without_bos]  # as training packed documents: no BOS
    # and the BOS matters here: the prompt with it (what the CLI used to send) samples other text
    generator = Generator(model, GenerationFormat.load(run / "model"))
    assert generator.generate(tokenizer(prompt)["input_ids"], 8, seed=3).text != served
