"""Causal-LM domain adaptation: documents, packing, a real training run, LoRA merge, replay, generation."""

import json

import pytest

from afinar.api import forgetting, generate
from afinar.api import train as train_lm
from afinar.core.config import DataArgs, load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.data.checks import checked_documents
from afinar.data.sources import prepare_texts, read_text_splits, split_documents
from afinar.tasks.causal_lm import pack, pack_documents

SENTENCES = ["The patient presented with fever and a dry cough for three days.",
             "Chest radiography showed bilateral infiltrates consistent with pneumonia.",
             "Treatment with intravenous antibiotics was started on admission.",
             "The fever resolved within forty-eight hours and the patient was discharged."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    """A repetitive 'domain': the same four sentences in rotating order, one numbered case per line."""
    lines = [f"Case {i}. " + " ".join(SENTENCES[i % 4:] + SENTENCES[:i % 4]) for i in range(48)]
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    valid.write_text("\n".join(lines[40:]) + "\n", encoding="utf-8")
    return train, valid


def lm_config(model, train, valid, out, **extra):
    sets = {"task": "causal_lm", "model.name": str(model), "data.source": str(train), "data.validation": str(valid),
            "train.output_dir": str(out), "train.run_name": "r", "train.max_steps": 30, "train.batch_size": 8,
            "train.learning_rate": 1e-2, "train.warmup_ratio": 0, "train.logging_steps": 10, "train.eval_every": 15,
            "train.early_stopping_patience": None, "train.metric_for_best_model": "loss", "lm.block_size": 32,
            "lm.stride": 32, "lm.max_eval_tokens": 256,
            # every line of this corpus is a near-duplicate of every other (the same four sentences): the leakage
            # check would rightly drop all of train, so here it only reports
            "checks.on_leakage": "warn", "checks.on_duplicates": "warn", **extra}
    return load_config(overrides=[f"{k}={v}" for k, v in sets.items()])


def test_documents_are_lines_unless_the_file_has_multi_line_paragraphs():
    assert split_documents("one\ntwo\n\nthree\n") == ["one\ntwo", "three"]
    assert split_documents("one\ntwo\n\nthree\n\n") == ["one\ntwo", "three"]
    assert split_documents("one\n\ntwo\n\nthree\n") == ["one", "two", "three"]
    assert split_documents("one\ntwo\nthree\n") == ["one", "two", "three"]
    assert split_documents("one\r\ntwo\r\n  \r\nthree") == ["one\ntwo", "three"]


def test_packing_fills_every_block_with_eos_between_documents(tiny_gpt2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    docs = [s * (i + 1) for i, s in enumerate(SENTENCES)]
    blocks = pack_documents(docs, tokenizer, 16)
    expected = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    assert blocks.shape == (len(expected) // 16, 16)  # full blocks only, no padding
    assert blocks.ravel().tolist() == expected[: blocks.size]  # conserved, in order, minus the remainder
    assert len(expected) - blocks.size < 16
    assert (blocks == tokenizer.eos_token_id).sum() == expected[: blocks.size].count(tokenizer.eos_token_id) >= 3
    assert pack([[1, 2, 3], [4, 5]], 2).tolist() == [[1, 2], [3, 4]]


def test_training_learns_the_domain_and_writes_a_complete_run(tiny_gpt2, corpus, tmp_path):
    """fp32 only: bf16 autocast goes through the same `Trainer` for every task (test_precision trains GPT-2 in it)."""
    result = train_lm(lm_config(tiny_gpt2, *corpus, tmp_path, **{"train.precision": "fp32"}))
    run = result.run_dir
    for name in ("config.yaml", "manifest.json", "metrics.json", "summary.md", "train_log.jsonl", "status.json",
                 "model/model.safetensors", "model/tokenizer_config.json"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists() and Run.open(run).status() == "finished"
    metrics = json.loads((run / "metrics.json").read_text())
    domain = metrics["perplexity"]["domain"]
    assert domain["after"] < domain["before"] / 100  # a random 2-layer model learns four sentences fast
    assert metrics["train"]["steps"] == 30 and metrics["validation"]["perplexity"] < 200
    assert metrics["forgetting"]["general"]["base_perplexity"] > 0 and "forgetting" in metrics["forgetting"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["sha256"]["train"] and manifest["data"]["documents"] == {"train": 40, "validation": 8}
    assert manifest["precision"]["precision"] == "fp32"
    assert "wikitext2 test rows" in manifest["general_text"]
    assert "perplexity" in (run / "summary.md").read_text()
    page = (run / "report.html").read_text()
    assert "general text" in page and "data:image/png;base64," in page and "confusion" not in page
    # the tuned model continues the domain, deterministically for a seed
    first = generate(run, "The patient presented with", max_new_tokens=12, seed=1)
    assert first == generate(run, "The patient presented with", max_new_tokens=12, seed=1)
    # greedy decoding of a 2-layer model trained 30 steps repeats itself, but only in the domain's words: an
    # untrained model picks from all 50,257 tokens
    words = generate(run, "The patient presented with", max_new_tokens=6, temperature=0).split()
    assert words and {w.strip(".,") for w in words} <= {w.strip(".,") for s in SENTENCES for w in s.split()} | {"Case"}
    again = forgetting(run)
    assert again["domain"]["tuned_perplexity"] == pytest.approx(domain["after"], rel=1e-4)
    assert (run / "forgetting.json").is_file()


def test_lora_with_replay_and_frozen_layers_saves_a_plain_merged_model(tiny_gpt2, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    config = lm_config(tiny_gpt2, *corpus, tmp_path, **{"lora.enabled": True, "lm.replay_fraction": 0.25,
                                                        "train.freeze_layers": 1, "train.max_steps": 4})
    result = train_lm(config)
    replay = result.metrics["replay"]
    assert replay["achieved_fraction"] == pytest.approx(0.25, abs=0.02) and replay["source"].startswith("wikitext2")
    assert result.metrics["data"]["blocks"]["train"] == replay["domain_blocks"] + replay["replay_blocks"]
    model_dir = result.run_dir / "model"
    assert not (model_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not any("lora" in name for name in model.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    changed = {n for n, p in model.state_dict().items() if not p.equal(base.state_dict()[n])}
    assert changed and all(n.startswith("transformer.h.1.") for n in changed)  # block 0 and embeddings frozen


def test_text_sources_and_bad_inputs(tmp_path):
    paragraphs = tmp_path / "notes.txt"
    paragraphs.write_text("first line\nof one\n\nsecond\nparagraph\n\nthird\nhere\n", encoding="utf-8")
    splits = prepare_texts(read_text_splits(DataArgs(source=str(paragraphs))), DataArgs(validation_fraction=0.34), 0)
    # carved as labelled data is (`data.sources.carve_rows`: sklearn rounds the held-out share up)
    assert len(splits.train) == 1 and len(splits.validation) == 2 and "carved" in splits.notes[0]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "alpha beta"}\n{"text": "gamma"}\n{"text": "Third  here"}\n{"text": "gamma"}\n',
                     encoding="utf-8")
    config = load_config(overrides=[f"data.source={jsonl}", f"data.validation={paragraphs}", "task=causal_lm"])
    splits, report = checked_documents(config)  # the checks labelled rows get, on documents
    assert splits.train == ["alpha beta", "gamma"] and len(splits.validation) == 3
    assert report.duplicates["train"].count == 1 and report.leakage["train-validation"]["exact"].count == 1
    assert any("dropped 1 train rows that also occur in validation (exact)" in note for note in splits.notes)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    for source, message in ((empty, "empty"), (tmp_path / "missing.txt", "not found")):
        with pytest.raises(AfinarError, match=message) as info:
            read_text_splits(DataArgs(source=str(source)))
        assert "\n" not in str(info.value)
    one = tmp_path / "one.txt"
    one.write_text("just one document\n", encoding="utf-8")
    with pytest.raises(AfinarError, match="data.validation"):
        prepare_texts(read_text_splits(DataArgs(source=str(one))), DataArgs(), 0)


def test_short_text_and_wrong_runs_are_clear_errors(tiny_gpt2, corpus, tmp_path):
    one_line = tmp_path / "one-line.txt"
    one_line.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    for size, valid, message in ((100, one_line, "fewer than one lm.block_size=100 block"),
                                 (256, corpus[1], "exceeds the 128 positions")):
        with pytest.raises(AfinarError, match=message):
            train_lm(lm_config(tiny_gpt2, corpus[0], valid, tmp_path, **{"lm.block_size": size}))
    assert not (tmp_path / "r").exists()  # input errors are found before a run folder is made
    with pytest.raises(AfinarError, match="empty"):
        generate(tiny_gpt2, "  ")
    assert generate(tiny_gpt2, "Hello", max_new_tokens=5, seed=3) == generate(tiny_gpt2, "Hello", max_new_tokens=5,
                                                                              seed=3)


def test_a_head_learning_rate_without_a_head_is_refused(tiny_gpt2, corpus, tmp_path):
    """It was silently ignored: a language model has no classification head to give it to."""
    with pytest.raises(AfinarError, match="train.head_learning_rate is set, but GPT2LMHeadModel has no "
                                          "classification head"):
        train_lm(lm_config(tiny_gpt2, *corpus, tmp_path, **{"train.head_learning_rate": 1e-2}))
