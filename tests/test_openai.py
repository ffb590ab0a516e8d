"""The OpenAI-compatible server as its clients use it: the official `openai` client and LangChain's `ChatOpenAI`
against a real uvicorn, streaming or not; OpenAI's error envelope and codes; requests decoding together; a client
that leaves frees its row."""

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from afinar.api import generate
from afinar.inference.decoding import DecodingBatch

TOKEN = "s3cret"
ASK = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def openai_server(sft_run):
    """`afinar serve` on the sft run: a real uvicorn on an ephemeral loopback port, with a token and a 64-token cap."""
    from afinar.serving.app import create_app
    from afinar.serving.http import server

    app = create_app(sft_run.run_dir, token=TOKEN, max_tokens=64)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    running = server(app, "127.0.0.1", port, TOKEN, log_level="warning")
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not running.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(openai_server):
    return openai.OpenAI(base_url=f"{openai_server}/v1", api_key=TOKEN, max_retries=0)


def test_the_official_openai_client_gets_the_answer_afinar_generate_gives(client, sft_run):
    [model] = client.models.list().data
    assert model.id == "r"
    reply = client.chat.completions.create(model="r", max_tokens=6, temperature=0, messages=ASK)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 6
    assert reply.choices[0].finish_reason in ("stop", "length")
    # the served prompt is the trained one: the same answer as `afinar generate`, greedy
    assert reply.choices[0].message.content == generate(sft_run.run_dir, "Name a colour.", max_new_tokens=6,
                                                        temperature=0)
    completion = client.completions.create(model="r", prompt="Name a colour.", max_tokens=6, temperature=0)
    assert completion.choices[0].text == reply.choices[0].message.content


def test_streaming_gives_the_text_the_same_request_gets_without_streaming(client):
    sampling = {"model": "r", "max_tokens": 24, "temperature": 0.9, "seed": 11}
    whole = client.chat.completions.create(messages=ASK, **sampling)
    chunks = list(client.chat.completions.create(messages=ASK, stream=True, stream_options={"include_usage": True},
                                                 **sampling))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and len(chunks) > 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # the usage chunk comes last
    text = client.completions.create(prompt="Name a colour.", **sampling).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(prompt="Name a colour.", stream=True, **sampling)]
    assert "".join(pieces) == text == whole.choices[0].message.content  # an sft run answers a prompt as a user turn


def test_stop_cuts_the_text_and_max_completion_tokens_bounds_it(client):
    full = client.chat.completions.create(model="r", messages=ASK, max_tokens=40, temperature=0).choices[0].message
    stop = full.content[len(full.content) // 2:][:3]
    assert stop.strip(), full.content  # the tiny model says something to cut
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model="r", messages=ASK, max_tokens=40, temperature=0,
                                                         stop=[stop, "never said"], stream=True))
            text, reason = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            cut = client.chat.completions.create(model="r", messages=ASK, max_tokens=40, temperature=0, stop=stop)
            text, reason = cut.choices[0].message.content, cut.choices[0].finish_reason
        assert text == full.content[:full.content.index(stop)] and reason == "stop"
    short = client.chat.completions.create(model="r", messages=ASK, max_completion_tokens=5, temperature=0)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"


def test_errors_come_in_openais_envelope_with_its_status_codes(client, openai_server):
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="r", messages=[{"role": "user", "content": "word " * 400}])
    assert too_long.value.code == "context_length_exceeded" and "256 positions" in too_long.value.message
    for field, value in (("frequency_penalty", 0.5), ("logprobs", True), ("n", 2), ("tools", [{"type": "function"}]),
                         ("response_format", {"type": "json_object"}), ("top_k", 5), ("max_tokens", 65)):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="r", messages=ASK, extra_body={field: value})
        assert refused.value.param == field, (field, refused.value.body)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="r", prompt="Hi", echo=True)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        openai.OpenAI(base_url=f"{openai_server}/v1", api_key="wrong", max_retries=0).models.list()
    assert wrong_key.value.body["code"] == "invalid_api_key"
    # fields that change nothing are accepted
    assert client.chat.completions.create(model="r", messages=ASK, max_tokens=2, user="u1", metadata={"a": "b"},
                                          frequency_penalty=0, store=False).choices[0].message.content is not None
    missing = httpx.get(f"{openai_server}/v1/nothing", headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_langchain_chat_openai_streams_an_answer(openai_server, client):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{openai_server}/v1", api_key=TOKEN, model="r", temperature=0, max_tokens=12,
                      streaming=True, max_retries=0)
    pieces = [chunk.content for chunk in chat.stream("Name a colour.")]
    expected = client.chat.completions.create(model="r", messages=ASK, max_tokens=12, temperature=0)
    assert "".join(pieces) == expected.choices[0].message.content and len(pieces) > 2


def test_requests_that_arrive_together_decode_together_and_a_client_that_leaves_frees_its_row(
        openai_server, client, monkeypatch):
    rows_per_step: list[int] = []
    step_seconds = [0.01]
    original = DecodingBatch.step

    def slow_step(self) -> None:  # a step as slow as a real model's, so requests overlap
        rows_per_step.append(len(self.rows))
        time.sleep(step_seconds[0])
        original(self)

    monkeypatch.setattr(DecodingBatch, "step", slow_step)
    alone = [client.chat.completions.create(model="r", messages=ASK, max_tokens=30, temperature=0.9, seed=seed)
             .choices[0].message.content for seed in range(4)]
    together: dict[int, str] = {}

    def ask(seed: int) -> None:
        reply = client.chat.completions.create(model="r", messages=ASK, max_tokens=30, temperature=0.9, seed=seed)
        together[seed] = reply.choices[0].message.content

    rows_per_step.clear()
    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert max(rows_per_step) >= 3  # shared steps
    assert [together[seed] for seed in range(4)] == alone  # each with its own seed

    step_seconds[0] = 0.1  # 64 tokens: 6 s to the end, unless the row is freed
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "r", "messages": ASK, "max_tokens": 64, "stream": True, "temperature": 1.5, "seed": 0}
    with httpx.stream("POST", f"{openai_server}/v1/chat/completions", json=body, headers=headers) as response:
        pieces = 0
        for line in response.iter_lines():  # until two pieces of text: the request is decoding
            pieces += line.startswith("data: ") and bool(json.loads(line[6:])["choices"][0]["delta"].get("content"))
            if pieces == 2:
                break
        assert httpx.get(f"{openai_server}/health").json()["decoding"] == 1
    _freed_within_a_second(openai_server)
    with pytest.raises(httpx.ReadTimeout):  # without streaming: the client gives up waiting and closes
        httpx.post(f"{openai_server}/v1/chat/completions", json={**body, "stream": False}, headers=headers,
                   timeout=0.5)
    _freed_within_a_second(openai_server)


def _freed_within_a_second(server: str) -> None:
    left = time.monotonic()
    while httpx.get(f"{server}/health").json()["decoding"]:
        assert time.monotonic() - left < 1.0, "the row of a client that left was not freed within a second"
        time.sleep(0.02)


def test_the_schema_and_the_server_agree_on_what_is_valid(sft_run):
    """What schemathesis (`--checks all`) found before: 0 taken for false, a negative seed and a tiny temperature
    failing with 500s, an empty prompt and max_tokens past the model's positions refused though schema-valid."""
    from fastapi.testclient import TestClient

    from afinar.serving.app import create_app

    ask = {"model": "r", "messages": ASK}
    with TestClient(create_app(sft_run.run_dir)) as http:
        schema = http.get("/openapi.json").json()["components"]["schemas"]
        for body, message in (({**ask, "stream": 0}, "stream: Input should be a valid boolean"), ({**ask, "n": True}, "n must be"),
                              ({**ask, "seed": -1}, "seed"), ({**ask, "max_tokens": True}, "max_tokens must be"),
                              ({**ask, "temperature": "0.7"}, "temperature must be a number")):
            refused = http.post("/v1/chat/completions", json=body)
            assert refused.status_code == 400 and message in refused.json()["error"]["message"], body
        tiny = http.post("/v1/chat/completions", json={**ask, "temperature": 1e-271, "max_tokens": 3})
        greedy = http.post("/v1/chat/completions", json={**ask, "temperature": 0, "max_tokens": 3})
        assert tiny.status_code == 200 and tiny.json()["choices"] == greedy.json()["choices"]
        long = http.post("/v1/completions", json={"model": "r", "prompt": "Hi", "max_tokens": 4096})
        assert long.status_code == 200 and long.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert long.json()["usage"]["total_tokens"] <= 256  # the tiny Llama's positions
        assert http.post("/v1/completions", json={"model": "r", "prompt": ""}).status_code == 400
    assert schema["CompletionRequest"]["properties"]["prompt"]["minLength"] == 1
    sampling = schema["ChatCompletionRequest"]["properties"]
    assert sampling["seed"]["anyOf"][0]["minimum"] == 0 and sampling["max_tokens"]["anyOf"][0]["maximum"] == 4096
    assert schema["ChatCompletionRequest"]["additionalProperties"] is False
