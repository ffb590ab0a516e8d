"""Preference tuning (`task: preference`): HH-RLHF transcripts split into prompt and answers exactly, a pair that is
not two answers to one conversation refused by its row, prompts cut from the left and never the answers, DPO
lowering the loss on the pairs it trained on, resume after SIGKILL giving the uninterrupted run's result, and the
result generating, serving and exporting to GGUF as an sft run does. Real HH-RLHF rows, a 2-layer Llama with
SmolLM2's tokenizer and template."""

import contextlib
import gzip
import io
import json
import math
import os

import pandas as pd
import pytest
from conftest import SHARED, afinar_cmd, sets, sigkill_at_checkpoint
from fastapi.testclient import TestClient

import afinar
from afinar import cli
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.models import load_tokenizer
from afinar.core.runs import Run
from afinar.data import chat
from afinar.data.preference import checked_pairs, encode_pair, encode_split, read_pairs, split_transcript
from afinar.evaluation.preference import preference_report
from afinar.inference import gguf_export
from afinar.inference.generation import GenerationFormat
from afinar.serving.app import create_app

HH = SHARED / "hh_rlhf_harmless" / "pairs.jsonl.gz"
SHORT = [360, 109, 135, 205, 208, 244, 293, 127]  # short real pairs (127: three turns)
MISMATCHED = 1254  # its answers hold "Human:", so the last "\n\nAssistant:" cuts chosen and rejected differently


@pytest.fixture(scope="module")
def hh_rows() -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_hh_transcripts_split_at_the_last_assistant_turn_exactly(hh_rows):
    prompt, answer = split_transcript(hh_rows[0]["chosen"])  # three exchanges; the answer ends the third
    assert prompt == [{"role": "user", "content": "what are some pranks with a pen i can do?"},
                      {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
                      {"role": "user", "content": "yep"},
                      {"role": "assistant", "content": hh_rows[0]["chosen"].split("\n\nAssistant: ")[2].split(
                          "\n\nHuman: ")[0]},
                      {"role": "user", "content": "okay some of these do not have anything to do with pens"}]
    assert answer == ("No, sorry!  All of these involve a pen, the point is that you can get funny results by doing "
                      "pranks with pens.")
    assert split_transcript(hh_rows[360]["chosen"])[0] == [
        {"role": "user", "content": hh_rows[360]["chosen"].split("\n\nAssistant:")[0][len("\n\nHuman: "):]}]
    pairs, refused, kind = read_pairs(pd.DataFrame(hh_rows[:50]), "hh")
    assert kind == "hh_transcripts" and not refused and len(pairs) == 50
    for pair, row in zip(pairs, hh_rows[:50]):  # every pair rebuilds both transcripts, turn by turn
        history = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in pair.prompt)
        for answer, transcript in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            assert " ".join(transcript.split()) == " ".join(f"{history}\n\nAssistant: {answer}".split())
    assert [len(p.prompt) for p in pairs[:3]] == [5, 5, 3]
    assert split_transcript("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: And you?\n\nAssistant:  Fine. ") == (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "And you?"}], "Fine.")


def test_a_pair_whose_prefixes_differ_is_refused_naming_its_row(hh_rows, tiny_llama, tmp_path):
    rows = [hh_rows[i] for i in (*SHORT, MISMATCHED, 86)]  # 86: an empty chosen answer
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = load_config(overrides=["task=preference", f"model={tiny_llama}", f"data.source={data}",
                                    "data.max_length=96"])
    checked = checked_pairs(config, load_tokenizer(config.model))
    assert checked.refused["train"] == [
        {"row": len(SHORT), "reason": "chosen and rejected differ before their last '\\n\\nAssistant:', so they are "
                                      "not two answers to one conversation"},
        {"row": len(SHORT) + 1, "reason": "empty answer"}]
    assert sum(len(ps) for ps in checked.pairs.values()) == len(SHORT)
    assert any("refused 2 pairs" in note and f"rows {len(SHORT)}" in note for note in checked.notes)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["check", "--set", "task=preference", "--set", f"model={tiny_llama}", "--set",
                         f"data.source={data}", "--set", "data.max_length=96"]) == 0
    assert "refused 1 (chosen and rejected differ before their last" in printed.getvalue()
    assert f": rows {len(SHORT)}\n" in printed.getvalue()

    # the other formats: an explicit prompt, and message lists whose prompt is what they share
    chosen = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    frame = pd.DataFrame([{"chosen": chosen, "rejected": [chosen[0], {"role": "assistant", "content": "Go away."}]},
                          {"chosen": chosen, "rejected": [{"role": "user", "content": "Hey"}, chosen[1]]}])
    pairs, refused, kind = read_pairs(frame, "lists")
    assert kind == "chosen_rejected" and [r["row"] for r in refused] == [1]
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ([chosen[0]], "Hello.", "Go away.")
    pairs, _, kind = read_pairs(pd.DataFrame([{"prompt": "Hi", "chosen": "Hello.", "rejected": [chosen[1]]}]), "x")
    assert kind == "prompt_chosen_rejected" and (pairs[0].prompt, pairs[0].rejected) == ([chosen[0]], "Hello.")


def test_a_long_prompt_is_cut_from_the_left_and_answers_never(hh_rows, tiny_llama):
    tokenizer = load_tokenizer(load_config(overrides=[f"model={tiny_llama}"]).model)
    pair = read_pairs(pd.DataFrame([hh_rows[0]]), "hh")[0][0]  # five prompt turns, then two answers
    whole = encode_pair(tokenizer, pair, 10_000)
    assert not whole.cut
    longest = max(len(whole.chosen_ids), len(whole.rejected_ids))
    budget = longest + 50  # room for the system prompt, the last user turn cut, the generation prompt
    fitted = encode_pair(tokenizer, pair, budget)
    assert fitted.cut and len(fitted.prompt_ids) + longest <= budget
    assert (fitted.chosen_ids, fitted.rejected_ids) == (whole.chosen_ids, whole.rejected_ids)  # answers whole
    assert whole.prompt_ids[-8:] == fitted.prompt_ids[-8:]  # the latest turn's end and the generation prompt stay
    text = tokenizer.decode(fitted.prompt_ids)
    assert text.startswith("<|im_start|>system\n")  # the template's own tokens are never cut
    assert "pranks with a pen" not in text and text.endswith("to do with pens<|im_end|>\n<|im_start|>assistant\n")
    assert encode_pair(tokenizer, pair, longest + 10) is None  # no room for the last turn: the pair cannot fit
    _, kept, stats = encode_split(tokenizer, [pair, pair], budget, "train")
    assert stats["prompts_cut"] == 2 and stats["dropped_answers_too_long"] == 0 and len(kept) == 2
    _, kept, stats = encode_split(tokenizer, [pair, read_pairs(pd.DataFrame([hh_rows[360]]), "hh")[0][0]],
                                  longest + 10, "train")
    assert stats["dropped_answers_too_long"] == 1 and len(kept) == 1


def test_the_held_out_figures_count_a_tie_as_half_and_pair_before_with_after():
    # pair 1: the policy moved toward chosen; pair 2: away from it; pair 3: unmoved (a tie, as every pair before)
    report = preference_report(policy_chosen=[-9.0, -12.0, -5.0], policy_rejected=[-12.0, -10.0, -6.0],
                               reference_chosen=[-10.0, -11.0, -5.0], reference_rejected=[-11.0, -11.0, -6.0],
                               beta=0.1)
    assert report["accuracy"] == pytest.approx(0.5) and report["accuracy_before"] == 0.5  # (1 + 0 + 0.5) / 3
    assert report["reward_margin"] == pytest.approx((0.2 - 0.2 + 0) / 3)
    assert report["likelihood_accuracy_before"] == pytest.approx((1 + 0.5 + 1) / 3)  # the reference ties on pair 2
    assert report["likelihood_accuracy"] == pytest.approx((1 + 0 + 1) / 3)
    assert report["gain"]["likelihood_accuracy"]["delta"] == pytest.approx(-0.5 / 3)
    assert report["loss_before"] == pytest.approx(math.log(2)) and report["n"] == 3
    with pytest.raises(AfinarError, match="preference.loss must be one of dpo"):
        load_config(overrides=["task=preference", "preference.loss=orpo"])


def run_overrides(model, data, out, name, **extra) -> list[str]:
    """A few-second DPO run of the tiny Llama on 8 short pairs, validated and tested on the same pairs."""
    values = {"task": "preference", "model": model, "data.source": data, "data.validation": data, "data.test": data,
              "checks.on_leakage": "warn", "train.output_dir": out, "train.run_name": name, "train.max_steps": 4,
              "train.batch_size": 4, "train.eval_every": 2, "train.learning_rate": 2e-2, "train.logging_steps": 1,
              "train.early_stopping_patience": None, "train.precision": "fp32", "train.keep_checkpoints": True,
              "data.max_length": 96, "lm.max_eval_tokens": 64, "lm.block_size": 64, "lm.stride": 64,
              "preference.generations": 1, "preference.generation_tokens": 4, **extra}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def pairs_file(hh_rows, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", [hh_rows[i] for i in SHORT])


@pytest.fixture(scope="module")
def preference_run(tiny_llama, pairs_file, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs")
    return afinar.train(load_config(overrides=run_overrides(tiny_llama, pairs_file, out, "whole")))


def test_dpo_lowers_the_loss_on_the_pairs_it_was_trained_to_prefer(preference_run):
    metrics = preference_run.metrics
    for split in ("validation", "test"):  # the very pairs trained on
        scores = metrics[split]
        assert scores["n"] == len(SHORT) and scores["loss_before"] == pytest.approx(math.log(2))
        assert scores["loss"] < math.log(2) - 0.005
        assert scores["reward_margin"] > 0 and scores["accuracy"] > 0.5
        assert scores["gain"]["accuracy"]["delta"] == pytest.approx(scores["accuracy"] - 0.5)
    best = Run.open(preference_run.run_dir).read_log()
    evaluated = [e["eval_loss"] for e in best if "eval_loss" in e]
    assert metrics["validation"]["loss"] == pytest.approx(min(evaluated), abs=1e-5)  # the best checkpoint, rescored
    assert metrics["train"]["trainable_parameters"] < metrics["train"]["total_parameters"] / 100  # LoRA only
    assert set(metrics["forgetting"]) >= {"domain", "general", "forgetting"}
    assert metrics["generations"][0].keys() >= {"prompt", "chosen", "rejected", "before", "after"}
    summary = (preference_run.run_dir / "summary.md").read_text()
    assert "preference accuracy (policy prefers chosen more than the reference) 0.5000 ->" in summary
    assert "likelihood accuracy" in summary and "wikitext2" in summary


def test_resume_after_sigkill_gives_the_uninterrupted_result(preference_run, tiny_llama, pairs_file, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # one thread, as the fixture's run
    killed = tmp_path / "killed"
    sigkill_at_checkpoint(afinar_cmd("train", *sets(run_overrides(tiny_llama, pairs_file, tmp_path, "killed"))),
                          killed / "checkpoints" / "checkpoint-2", env)
    assert Run.open(killed).status() == "running"

    assert cli.main(["train", str(killed / "config.yaml"), "--resume"]) == 0
    expected, got = preference_run.metrics, json.loads((killed / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert got[split] == expected[split]  # exactly, on CPU
    assert got["train"]["steps"] == expected["train"]["steps"] == 4


def test_the_tuned_model_generates_serves_and_exports_as_an_sft_run(preference_run, pairs_file, monkeypatch):
    monkeypatch.delenv("AFINAR_SERVE_TOKEN", raising=False)
    model = preference_run.run_dir / "model"
    tokenizer = load_tokenizer(load_config(overrides=[f"model={model}"]).model)
    prompt_format = GenerationFormat.load(model)
    assert (prompt_format.chat, prompt_format.bos, prompt_format.eos_token) == (True, False, "<|im_end|>")
    config = Run.open(preference_run.run_dir).config()
    checked = checked_pairs(config, load_tokenizer(config.model))
    pair, row = checked.pairs["test"][0], checked.datasets["test"][0]
    assert prompt_format.chat_ids(tokenizer, pair.prompt) == row["prompt_ids"]  # what training saw before an answer
    assert chat.render_ids(tokenizer, pair.prompt, generation_prompt=True) == row["prompt_ids"]

    text = afinar.generate(preference_run.run_dir, "Name a colour.", max_new_tokens=4, temperature=0)
    with TestClient(create_app(preference_run.run_dir)) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": preference_run.run_dir.name, "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == text

    modelfile, record = gguf_export._ollama(model, prompt_format, "model-f16.gguf")  # what `export --format gguf`
    assert record["template"] == "ChatML, as a Go template" and record["stop"] == "<|im_end|>"  # writes beside it
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.slow
def test_the_gguf_export_of_a_preference_run_reads_back_as_the_run(preference_run):
    """The whole export (its read-back check costs 12 s here): the same as an sft run's."""
    record = afinar.export(preference_run.run_dir, format="gguf")
    assert (preference_run.run_dir / "gguf" / "model-f16.gguf").is_file() and record["exports"]["f16"]["check"]
