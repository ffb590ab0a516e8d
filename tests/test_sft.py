"""Instruction tuning: every data format becomes conversations, the loss sees exactly the assistant's tokens,
inference renders the prompt with the very tokens training saw, and a run trains, scores and saves its template."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED, tweet_rows
from transformers import AutoTokenizer

import afinar
from afinar.api import generate
from afinar.core.assets import model_path
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.data import chat
from afinar.tasks.sft import marked_example

SEED_TASKS = SHARED / "self_instruct_seed" / "seed_tasks.jsonl"
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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
        "self_instruct": pd.read_json(SEED_TASKS, lines=True).head(3),
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


def _seed_tasks(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(SEED_TASKS.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return path


def _sft_overrides(model, data, out, **extra) -> list[str]:
    sets = {"task": "sft", "model": str(model), "data.source": str(data), "train.output_dir": str(out),
            "train.run_name": "r", "train.max_steps": 12, "train.batch_size": 8, "train.learning_rate": 3e-3,
            "train.eval_every": 4, "train.logging_steps": 2, "train.early_stopping_patience": None,
            "data.max_length": 160, "lm.max_eval_tokens": 256, "lm.block_size": 64, "lm.stride": 64,
            "sft.validity_samples": 8, "sft.generation_samples": 2, "sft.max_new_tokens": 8, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory):
    """One finished sft run of the tiny Llama (SmolLM2's tokenizer and template) on self-instruct seed tasks."""
    folder = tmp_path_factory.mktemp("sft")
    return afinar.train(load_config(overrides=_sft_overrides(tiny_llama, _seed_tasks(folder, 80), folder)))


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


@pytest.fixture(scope="module")
def openai_server(sft_run):
    """`afinar serve` on the sft run: a real uvicorn on an ephemeral loopback port, with a token."""
    import socket
    import threading
    import time

    from afinar.serving.app import create_app
    from afinar.serving.http import server

    app = create_app(sft_run.run_dir, token="s3cret")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    running = server(app, "127.0.0.1", port, "s3cret", log_level="warning")
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not running.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    running.should_exit = True
    thread.join(10)


def test_the_official_openai_client_gets_answers_from_afinar_serve(openai_server, sft_run):
    import openai

    client = openai.OpenAI(base_url=openai_server, api_key="s3cret", max_retries=0)
    [model] = client.models.list().data
    reply = client.chat.completions.create(model=model.id, max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": "Name a colour."}])
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 6
    assert reply.choices[0].finish_reason in ("stop", "length")
    # the served prompt is the trained one: the same answer as `afinar generate`, greedy
    assert reply.choices[0].message.content == generate(sft_run.run_dir, "Name a colour.", max_new_tokens=6,
                                                        temperature=0)
    completion = client.completions.create(model=model.id, prompt="Name a colour.", max_tokens=6, temperature=0)
    assert completion.choices[0].text == reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=openai_server, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "x"}], stream=True)
    assert "stream=true is not supported" in refused.value.response.json()["detail"]


def test_classification_data_as_instructions_is_scored_by_label_continuation(tiny_gpt2, tmp_path):
    rows = tweet_rows("train", 160)
    path = tmp_path / "tweets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    template = "Sentiment of this tweet ({labels}): {text}"
    result = afinar.train(load_config(overrides=_sft_overrides(tiny_gpt2, path, tmp_path, **{
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

    data = _seed_tasks(tmp_path, 60)
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


def test_the_openai_schema_and_server_agree_on_what_is_valid(sft_run):
    """What schemathesis (`--checks all`) found: 0 taken for stream=false, a negative seed and a tiny temperature
    failing with 500s, an empty prompt and max_tokens past the model's positions refused though schema-valid."""
    from fastapi.testclient import TestClient

    from afinar.serving.app import create_app

    ask = {"model": "m", "messages": [{"role": "user", "content": "Name a colour."}]}
    with TestClient(create_app(sft_run.run_dir)) as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        for body, message in (({**ask, "stream": 0}, "stream must be false"), ({**ask, "n": True}, "n must be"),
                              ({**ask, "seed": -1}, "seed"), ({**ask, "max_tokens": True}, "max_tokens must be"),
                              ({**ask, "temperature": "0.7"}, "temperature must be a number")):
            refused = client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 422 and message in refused.json()["detail"], body
        tiny = client.post("/v1/chat/completions", json={**ask, "temperature": 1e-271, "max_tokens": 3})
        greedy = client.post("/v1/chat/completions", json={**ask, "temperature": 0, "max_tokens": 3})
        assert tiny.status_code == 200 and tiny.json()["choices"] == greedy.json()["choices"]
        long = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 4096})
        assert long.status_code == 200 and long.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert long.json()["usage"]["total_tokens"] <= 256  # the tiny Llama's positions
        assert client.post("/v1/completions", json={"model": "m", "prompt": ""}).status_code == 422
    assert schema["CompletionRequest"]["properties"]["prompt"]["minLength"] == 1
    sampling = schema["ChatCompletionRequest"]["properties"]
    assert sampling["seed"]["anyOf"][0]["minimum"] == 0 and sampling["stream"]["const"] is False


def test_summaries_are_scored_by_rouge_against_every_reference_beside_the_zero_shot_base(tiny_llama, tmp_path):
    """DialogSum's real rows: train has one `summary`, test three (`summary1..3`, no `summary`); the prompt column is
    wrapped in sft.template; the tuned and the base model's greedy generations are scored on the same prompts."""
    dialogsum = SHARED / "dialogsum"
    for split, n in (("train", 40), ("test", 4)):
        with open(dialogsum / f"{split}.jsonl", encoding="utf-8") as handle:
            (tmp_path / f"{split}.jsonl").write_text("".join(next(handle) for _ in range(n)), encoding="utf-8")
    result = afinar.train(load_config(overrides=_sft_overrides(tiny_llama, tmp_path / "train.jsonl", tmp_path, **{
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
