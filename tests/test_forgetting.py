"""Perplexity, the general text and its replay/held-out split, replay mixing, and the before/after check."""

import re
from pathlib import Path

import numpy as np
import pytest

from afinar import api
from afinar.core.config import LMArgs, load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.evaluation.forgetting import (
    general_corpus,
    general_text,
    measure_forgetting,
    mix_replay,
    perplexity,
    replay_corpus,
    wikitext2_rows,
    wikitext2_split,
)

TEXT = ("The patient presented with fever and a dry cough for three days. Chest radiography showed bilateral "
        "infiltrates consistent with pneumonia. Treatment with intravenous antibiotics was started. ")
WIKITEXT_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw" / "wiki.test.raw"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_gpt2), AutoTokenizer.from_pretrained(tiny_gpt2)


def test_non_overlapping_windows_equal_the_naive_mean_loss(tiny):
    import torch

    model, tokenizer = tiny
    ids = tokenizer(TEXT * 3, return_tensors="pt")["input_ids"][0][:64]
    text = tokenizer.decode(ids)
    assert len(tokenizer(text)["input_ids"]) == 64
    with torch.no_grad():  # two 32-token blocks, each scoring its last 31 tokens
        losses = [model(input_ids=ids[None, i:i + 32], labels=ids[None, i:i + 32]).loss for i in (0, 32)]
    naive = float(torch.exp(torch.stack(losses).mean()))
    assert perplexity(model, tokenizer, text, 32, 32) == pytest.approx(naive, rel=1e-5)


def test_the_window_batch_is_capped_by_its_logits_memory(tiny, monkeypatch):
    """32 windows x 256 tokens x SmolLM2's 49,152 words are 1.6 GB of fp32 logits per copy: the forgetting check
    after an sft run peaked at 6.7 GB of RAM scoring 32,768 WikiText tokens, 1.6 GB with the cap (same
    perplexity to 1e-7). The cap changes the batching, never the figure."""
    from afinar.evaluation import forgetting

    model, tokenizer = tiny
    text = TEXT * 6
    expected = perplexity(model, tokenizer, text, 16, 16, batch_size=1)
    rows = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids, **kw: rows.append(len(input_ids)) or original(
        input_ids=input_ids, **kw))
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(forgetting, "LOGITS_BUDGET_BYTES", 3 * 16 * vocab * 4 * 3)  # room for three windows
    assert perplexity(model, tokenizer, text, 16, 16, batch_size=1000) == pytest.approx(expected, rel=1e-6)
    assert max(rows) == 3 and len(rows) > 1


def test_strided_windows_match_the_hf_guide_loop_for_any_batch_size(tiny):
    import torch

    model, tokenizer = tiny
    text = TEXT * 6
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    nll, count, previous = 0.0, 0, 0
    with torch.no_grad():  # the loop of the Hugging Face perplexity guide, one window at a time
        for begin in range(0, ids.shape[1], 16):
            end = min(begin + 32, ids.shape[1])
            window = ids[:, begin:end]
            target = window.clone()
            target[:, : -(end - previous)] = -100
            valid = int((target[:, 1:] != -100).sum())
            nll += float(model(input_ids=window, labels=target).loss) * valid
            count += valid
            previous = end
            if end == ids.shape[1]:
                break
    reference = float(np.exp(nll / count))
    values = [perplexity(model, tokenizer, text, 32, 16, batch_size=b) for b in (1, 3, 8)]
    assert all(np.isfinite(values))
    assert values == pytest.approx([reference] * 3, rel=1e-5)
    assert perplexity(model, tokenizer, text, 32, 16, max_tokens=40) != pytest.approx(reference)
    with pytest.raises(AfinarError, match="stride"):
        perplexity(model, tokenizer, text, 32, 64)
    with pytest.raises(AfinarError, match="positions"):
        perplexity(model, tokenizer, text, 256, 256)


def test_wikitext_is_the_hf_reconstruction_split_between_replay_and_the_check():
    rows = wikitext2_rows()
    assert len(rows) == 4358
    if WIKITEXT_RAW.is_file():  # the recipe in shared/data/wikitext2_raw/SOURCE.txt
        lines = WIKITEXT_RAW.read_text(encoding="utf-8").splitlines(keepends=True)
        assert list(rows) == [line if line.strip() else "" for line in lines]
    split = wikitext2_split()
    lm = LMArgs(replay_fraction=0.2)
    replay, general = replay_corpus(lm), general_corpus(lm)
    assert replay.text == "\n\n".join(rows[:split]) and general.text == "\n\n".join(rows[split:])
    assert general_text(lm) == general.text == general_text(LMArgs())  # the same text with or without replay
    assert f"rows 0-{split - 1}" in replay.source and f"rows {split}-4357" in general.source
    assert 0.4 < split / len(rows) < 0.6 and re.match(r" = [^=]", rows[split + 1])  # starts a whole article
    titles = [set(re.findall(r"^ = ([^=].*?) = $", text, flags=re.M)) for text in (replay.text, general.text)]
    assert titles[0] and titles[1] and not titles[0] & titles[1]
    paragraphs = [{p for p in text.split("\n\n") if len(p) > 200} for text in (replay.text, general.text)]
    assert not paragraphs[0] & paragraphs[1]  # no replayed paragraph is ever measured


def test_replay_and_general_text_files(tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("Some general text.\n", encoding="utf-8")
    assert general_text(LMArgs(general_text=str(general))) == "Some general text.\n"
    with pytest.raises(AfinarError, match="same file"):
        replay_corpus(LMArgs(general_text=str(general), replay_source=str(general), replay_fraction=0.1))
    replay = tmp_path / "replay.txt"
    replay.write_text("one\ntwo\n", encoding="utf-8")
    assert replay_corpus(LMArgs(replay_source=str(replay), replay_fraction=0.1)).documents == ["one", "two"]
    with pytest.raises(AfinarError, match="not found"):
        general_text(LMArgs(general_text=str(tmp_path / "missing.txt")))


def test_replay_blocks_make_the_requested_fraction():
    domain = np.arange(300).reshape(30, 10)
    replay = -np.arange(1, 201).reshape(20, 10)
    mixed, info = mix_replay(domain, replay, 0.25, seed=0)
    is_replay = mixed[:, 0] < 0
    assert is_replay.sum() == info["replay_blocks"] == 10 and len(mixed) == 40 and info["achieved_fraction"] == 0.25
    assert len({tuple(row) for row in mixed[is_replay]}) == 10 and not info["repeated"]  # no block twice
    assert sorted(map(tuple, mixed[~is_replay])) == sorted(map(tuple, domain))  # every domain block kept
    assert is_replay[:20].any() and is_replay[20:].any()  # shuffled in, not appended
    assert np.array_equal(mixed, mix_replay(domain, replay, 0.25, seed=0)[0])
    mixed, info = mix_replay(domain, replay[:3], 0.5, seed=0)
    assert (mixed[:, 0] < 0).sum() == 30 and info["repeated"]


def test_measure_forgetting_flags_a_damaged_model(tiny, tiny_gpt2, tmp_path):
    import torch

    model, tokenizer = tiny
    damaged = tmp_path / "damaged"
    copy = type(model).from_pretrained(tiny_gpt2)
    with torch.no_grad():
        copy.lm_head.weight.mul_(30)  # tied to the embeddings: confident, random predictions
    copy.save_pretrained(damaged)
    tokenizer.save_pretrained(damaged)
    lm = LMArgs(block_size=32, stride=32, max_eval_tokens=256)
    same = measure_forgetting(tiny_gpt2, tiny_gpt2, TEXT * 4, general_text(lm), lm)
    assert same["general"]["ratio"] == pytest.approx(1.0) and not same["forgetting"]
    assert same["general"]["scored_tokens"] == 256 - 8  # 8 windows of 32, the first token of each unscored
    worse = measure_forgetting(tiny_gpt2, damaged, TEXT * 4, general_text(lm), lm)
    assert worse["general"]["ratio"] > lm.forgetting_ratio and worse["forgetting"]


def test_forgetting_needs_a_finished_causal_lm_run(tmp_path):
    config = load_config(overrides=[f"train.output_dir={tmp_path}", "train.run_name=c"])
    run = Run.create(config)
    with pytest.raises(AfinarError, match="not finished"):
        api.forgetting(run.path)
    run.model_dir.mkdir()
    run.set_status("finished")
    with pytest.raises(AfinarError, match="afinar forgetting does not apply to task 'classification'"):
        api.forgetting(run.path)
