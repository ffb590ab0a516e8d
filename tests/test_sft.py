"""Instruction tuning: every data format becomes conversations, the loss sees exactly the assistant's tokens,
inference renders the prompt with the very tokens training saw, and a run trains, scores and saves its template."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED, seed_tasks, sft_overrides, tweet_rows
from transformers import AutoTokenizer

import afinar
from afinar.api import generate
from afinar.core.assets import model_path
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.data import chat
from afinar.tasks.sft import marked_example

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6, of course."}]

# role headers, no EOS of its own; a generation prompt, so the model never writes the header itself
NO_EOS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def smol_tokenizer():
    return AutoTokenizer.from_pretrained(model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return AutoTokenizer.from_pretrained(model_path("gpt2-tokenizer"))


def trained_spans(tokenizer, encoded: chat.Encoded) -> list[str]:
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != chat.IGNORE:
            assert label == token  # the model learns to predict the token itself (it shifts by one)
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_the_loss_mask_covers_exactly_the_assistant_turns(smol_tokenizer):
    encoded = chat.encode(smol_tokenizer, CONVERSATION, 512)
    assert trained_spans(smol_tokenizer, encoded) == ["4<|im_end|>\n", "6, of course.<|im_end|>\n"]
    assert "What is 2 + 2?" in smol_tokenizer.decode(encoded.input_ids)  # the prompt is read, not trained


def test_a_template_without_eos_gets_it_appended_and_still_masks_exactly(gpt2_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(model_path("gpt2-tokenizer"))
    assert not tokenizer.chat_template  # GPT-2 has none: afinar's documented default is used
    encoded = chat.encode(tokenizer, CONVERSATION, 512)
    assert tokenizer.chat_template == chat.DEFAULT_CHAT_TEMPLATE
    assert trained_spans(tokenizer, encoded) == ["4<|endoftext|>", "6, of course.<|endoftext|>"]
    tokenizer.chat_template = NO_EOS_TEMPLATE
    spans = trained_spans(tokenizer, chat.encode(tokenizer, CONVERSATION[:3], 512))
    assert spans == ["4\n<|endoftext|>"]  # EOS appended: the model learns where an answer ends


@pytest.mark.parametrize("which", ["smol", "gpt2"])
def test_prompt_tokens_at_inference_equal_those_at_training(which, smol_tokenizer, gpt2_tokenizer):
    tokenizer = smol_tokenizer if which == "smol" else gpt2_tokenizer
    encoded = chat.encode(tokenizer, CONVERSATION, 512)
    trained = [i for i, label in enumerate(encoded.labels) if label != chat.IGNORE]
    last_answer_starts = max(i for i in trained if encoded.labels[i - 1] == chat.IGNORE)
    at_inference = chat.render_ids(tokenizer, chat.prompt_of(CONVERSATION), generation_prompt=True)
    assert encoded.input_ids[:len(at_inference)] == at_inference
    assert last_answer_starts == len(at_inference)  # the last answer's loss starts right after the prompt


def test_a_template_that_drops_the_answer_is_an_error(gpt2_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(model_path("gpt2-tokenizer"))
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                               "{% else %}A:\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(AfinarError, match="drops the assistant's answer"):
        chat.encode(tokenizer, CONVERSATION[1:3], 512)


def test_a_long_prompt_is_shortened_in_its_text_so_the_answer_is_trained_whole(smol_tokenizer):
    long_prompt = [{"role": "user", "content": "Say yes. " + "word " * 200 + "Now answer."},
                   {"role": "assistant", "content": "yes"}]
    encoded = chat.encode(smol_tokenizer, long_prompt, 64)
    assert encoded.shortened and not encoded.cut and len(encoded.input_ids) <= 64
    assert trained_spans(smol_tokenizer, encoded) == ["yes<|im_end|>\n"]  # the whole answer and its end of turn
    text = smol_tokenizer.decode(encoded.input_ids)
    assert "Say yes." in text and "Now answer.<|im_end|>\n<|im_start|>assistant\n" in text  # head, tail, prompt end
    long_answer = [{"role": "user", "content": "Recite."}, {"role": "assistant", "content": "word " * 200}]
    encoded = chat.encode(smol_tokenizer, long_answer, 64)
    assert encoded.cut and not encoded.shortened and len(encoded.input_ids) == 64 and encoded.trained > 0


def test_a_conversation_whose_template_alone_is_too_long_is_dropped_and_counted(smol_tokenizer):
    from afinar.tasks.sft import _encode_split

    no_room = [{"role": "system", "content": "rule " * 80}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "yes"}]
    assert chat.encode(smol_tokenizer, no_room, 64).trained == 0
    dataset, stats = _encode_split(smol_tokenizer, [no_room, CONVERSATION], 64, "train")
    assert len(dataset) == 1 and stats["dropped_empty_answer"] == 1 and stats["answers_cut"] == 1
    with pytest.raises(AfinarError, match="every answer is cut away"):
        _encode_split(smol_tokenizer, [no_room], 64, "train")


def test_label_scores_of_a_long_prompt_see_its_whole_end_not_a_cut_one(tiny_llama):
    """Cut at its end, a long prompt's last tokens are its own, the same for every label: all labels tied and
    argmax answered label 0. Shortened in its text, the labels follow the generation prompt and differ; a
    prompt that cannot fit is skipped and counted, never scored."""
    from transformers import AutoModelForCausalLM

    from afinar.tasks.sft import label_log_probs

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    labels = ["negative", "neutral", "positive"]
    long = [{"role": "user", "content": "Classify this tweet. " + "what a lovely day " * 40 + "Answer now."}]
    no_room = [{"role": "system", "content": "rule " * 80}, {"role": "user", "content": "hi"}]
    scored = label_log_probs(model, tokenizer, [long, no_room, [{"role": "user", "content": "hi"}]], labels, 64)
    assert scored.shortened == 1 and scored.skipped.tolist() == [True if p is no_room else False
                                                                 for p in (long, no_room, long)]
    assert len(set(np.round(scored.scores[0], 5))) == 3 and np.isnan(scored.scores[1]).all()
    assert len(scored.predictions) == 2
    fitted = chat.fit_prompt(tokenizer, long, 60)
    rendered = tokenizer.decode(chat.render_ids(tokenizer, fitted, generation_prompt=True))
    assert len(chat.render_ids(tokenizer, fitted, generation_prompt=True)) <= 60
    assert "Classify this tweet." in rendered and rendered.endswith("Answer now.<|im_end|>\n<|im_start|>assistant\n")


def test_every_format_becomes_conversations(tmp_path):
    frames = {
        "messages": pd.DataFrame({"messages": [json.dumps(CONVERSATION)]}),
        "prompt_completion": pd.DataFrame({"prompt": ["Hi"], "completion": ["Hello"]}),
        "alpaca": pd.DataFrame({"instruction": ["Translate"], "input": ["gato"], "output": ["cat"]}),
        "self_instruct": pd.read_json(SHARED / "self_instruct_seed" / "seed_tasks.jsonl", lines=True).head(3),
    }
    found = {kind: chat.conversations(frame, kind) for kind, frame in frames.items()}
    assert {kind: chat.detect_format(list(f.columns)) for kind, f in frames.items()} == {k: k for k in frames}
    assert found["messages"] == [CONVERSATION]
    assert found["alpaca"] == [[{"role": "user", "content": "Translate\n\ngato"},
                                {"role": "assistant", "content": "cat"}]]
    assert len(found["self_instruct"]) == sum(len(i) for i in frames["self_instruct"]["instances"])
    with pytest.raises(AfinarError, match="row 0: a conversation has no assistant message"):
        chat.conversations(pd.DataFrame({"messages": [[{"role": "user", "content": "x"}]]}), "f.jsonl")
    with pytest.raises(AfinarError, match="no conversation columns"):
        chat.conversations(pd.DataFrame({"body": ["x"]}), "f.csv")


def test_marked_example_shows_what_the_loss_sees(smol_tokenizer):
    shown = marked_example(smol_tokenizer, CONVERSATION[1:3], 128)
    assert shown.endswith("<|im_start|>assistant\n[[4<|im_end|>\n]]") and shown.count("[[") == 1


def test_instruction_tuning_end_to_end_saves_its_template_and_scores(sft_run, tiny_llama):
    run = sft_run.run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["format"] == "self_instruct" and "lora.enabled = true" in manifest["notes"][0]
    saved = AutoTokenizer.from_pretrained(run / "model")
    assert saved.chat_template == AutoTokenizer.from_pretrained(tiny_llama).chat_template
    assert chat.template_digest(saved) == manifest["chat_template_sha256"]
    metrics = sft_run.metrics
    losses = [e["eval_loss"] for e in Run(run).read_log() if "eval_loss" in e]
    assert losses[-1] < losses[0]  # validation loss on responses falls
    assert metrics["validation"]["perplexity"] > 1 and "accuracy" not in metrics["validation"]  # free text
    assert len(metrics["generations"]) == 2 and {"domain", "general"} <= set(metrics["forgetting"])
    page = (run / "report.html").read_text()
    assert "What the loss sees" in page and "Sample generations" in page
    # `afinar generate` renders a prompt as the run's own check did: the same greedy answer
    shown = metrics["generations"][0]
    assert generate(run, shown["prompt"], max_new_tokens=8, temperature=0).strip() == shown["generated"]


def test_classification_data_as_instructions_is_scored_by_label_continuation(tiny_gpt2, tmp_path):
    rows = tweet_rows("train", 160)
    path = tmp_path / "tweets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    template = "Sentiment of this tweet ({labels}): {text}"
    result = afinar.train(load_config(overrides=sft_overrides(tiny_gpt2, path, tmp_path, **{
        "sft.template": template, "data.max_length": 40})))
    validation = result.metrics["validation"]
    # at 40 tokens some prompts are too long: their tweet is shortened, none is cut at its end or skipped
    assert validation["n"] == validation["scored_rows"] == 16 and validation["rows_skipped"] == 0
    assert validation["prompts_shortened"] > 0 and result.metrics["data"]["train"]["prompts_shortened"] > 0
    assert validation["accuracy"] == np.trace(validation["confusion_matrix"]) / 16
    assert result.metrics["free_generation"]["rows"] == 8
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["sft"]["label_set"] == ["negative", "neutral", "positive"]
    assert "Sentiment of this tweet (negative, neutral, positive)" in report["sft"]["examples"][0]


def test_label_scores_with_a_shared_prompt_cache_equal_full_sequence_scores(tiny_llama):
    """The cached path (one prompt pass, short label passes, left padding) against the plain computation."""
    import torch
    from transformers import AutoModelForCausalLM

    from afinar.tasks.sft import label_log_probs

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts = [[{"role": "user", "content": text}] for text in ("short", "a much longer prompt than the other one",
                                                                 "mid length prompt", "too long to fit " * 30)]
    labels = ["negative", "neutral", "positive", "not sure at all"]
    cached = label_log_probs(model, tokenizer, prompts, labels, max_length=128, batch_size=2)
    assert cached.shortened == 1 and not cached.skipped.any()
    for i, prompt in enumerate(prompts):
        answers = [chat.encode(tokenizer, [*prompt, {"role": "assistant", "content": label}], 10**9).input_ids
                   for label in labels]
        longest = max(map(len, answers)) - len(chat.render_ids(tokenizer, prompt, generation_prompt=True))
        prompt = chat.fit_prompt(tokenizer, prompt, 128 - longest)  # the long one shortened; the others as they are
        for j, label in enumerate(labels):
            encoded = chat.encode(tokenizer, [*prompt, {"role": "assistant", "content": label}], 10**9)
            ids = torch.tensor([encoded.input_ids])
            with torch.no_grad():
                logits = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            gold = torch.tensor(encoded.labels[1:])
            plain = sum(logits[k, gold[k]].item() for k in range(len(gold)) if gold[k] != chat.IGNORE)
            assert cached.scores[i, j] == pytest.approx(plain, abs=1e-3), (prompt, label)


def test_afinar_check_on_instruction_data_shows_lengths_and_what_the_loss_sees(tiny_llama, tmp_path, capsys):
    from afinar import cli

    data = seed_tasks(tmp_path, 60)
    assert cli.main(["check", "--set", "task=sft", "--model", str(tiny_llama), "--data", str(data),
                     "--set", "data.max_length=64"]) == 0
    out = capsys.readouterr().out
    assert "data checks (self_instruct" in out and "prompts shortened to fit data.max_length" in out
    assert out.count("what the loss sees") == 2 and "<|im_start|>assistant\n[[" in out


def test_a_multi_turn_conversation_with_a_template_without_eos_ends_only_the_last_answer_with_it(gpt2_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(model_path("gpt2-tokenizer"))
    tokenizer.chat_template = NO_EOS_TEMPLATE
    spans = trained_spans(tokenizer, chat.encode(tokenizer, CONVERSATION, 512))
    assert spans == ["4\n", "6, of course.\n<|endoftext|>"]


def test_a_template_without_a_generation_prompt_is_refused(gpt2_tokenizer):
    """Without one the loss trained the literal "assistant: " header, and the model learnt to write it."""
    tokenizer = AutoTokenizer.from_pretrained(model_path("gpt2-tokenizer"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(AfinarError, match="adds nothing for add_generation_prompt"):
        chat.encode(tokenizer, CONVERSATION, 512)


def test_summaries_are_scored_by_rouge_against_every_reference_beside_the_zero_shot_base(tiny_llama, tmp_path):
    """DialogSum's real rows: train has one `summary`, test three (`summary1..3`, no `summary`); the prompt column is
    wrapped in sft.template; the tuned and the base model's greedy generations are scored on the same prompts."""
    dialogsum = SHARED / "dialogsum"
    for split, n in (("train", 40), ("test", 4)):
        with open(dialogsum / f"{split}.jsonl", encoding="utf-8") as handle:
            (tmp_path / f"{split}.jsonl").write_text("".join(next(handle) for _ in range(n)), encoding="utf-8")
    result = afinar.train(load_config(overrides=sft_overrides(tiny_llama, tmp_path / "train.jsonl", tmp_path, **{
        "data.test": str(tmp_path / "test.jsonl"), "sft.prompt_column": "dialogue", "sft.response_column": "summary",
        "sft.reference_columns": "summary1,summary2,summary3", "sft.template": "Summarize this dialogue:\n{text}",
        "sft.metrics": "rouge", "sft.metric_new_tokens": 6, "train.max_steps": 4, "data.max_length": 96})))
    scores = result.metrics["generation_scores"]
    assert scores["split"] == "test" and scores["rows"] == 4 and scores["prompts_shortened"] == 4
    assert scores["examples"][0]["prompt"].startswith("Summarize this dialogue:\n#Person1#")
    assert len(scores["examples"][0]["references"]) == 3
    rouge = scores["rouge"]
    for key in ("rouge1", "rouge2", "rougeL"):
        gain = np.mean(rouge["tuned"]["rows"][key]) - np.mean(rouge["zero_shot"]["rows"][key])
        assert rouge["gain"][key]["delta"] == pytest.approx(gain)
        assert 0 <= rouge["tuned"][key] <= 1
    # a reference list scores the best of its references (score_multi), never their mean
    from afinar.evaluation.generated import row_scores

    best = row_scores("rouge", ["the cat sat"], [["a dog ran", "the cat sat"]])
    assert best["rougeL"][0] == pytest.approx(1.0)
    summary = (result.run_dir / "summary.md").read_text()
    assert "fine-tuned vs the base model zero-shot" in summary and "rougeL:" in summary
