"""The HTTP API in-process: predictions as the library makes them, micro-batching, limits, auth, schema."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import tiny_overrides, tweet_rows
from fastapi.testclient import TestClient

from afinar.api import train
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.serving.app import create_app
from afinar.tasks.registry import for_run

TEXTS = ["I love this so much", "this is awful", "", "ok", "worst day ever, nothing works"]


@pytest.fixture(scope="module")
def run_dir(tiny_bert, tmp_path_factory):
    """A finished run of the tiny BERT on a few hundred real tweets, shared by the module's tests."""
    folder = tmp_path_factory.mktemp("serve-run")
    files = []
    for split, n in (("train", 240), ("test", 60)):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in tweet_rows(split, n)), encoding="utf-8")
        files.append(path)
    overrides = tiny_overrides(tiny_bert, *files, folder / "runs", **{"train.epochs": 1})
    return train(load_config(overrides=overrides)).run_dir


@pytest.fixture(scope="module")
def classifier(run_dir):
    run = Run.open(run_dir)
    return for_run(run).load_predictor(run, "torch")


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv("AFINAR_SERVE_TOKEN", raising=False)


class CountingClassifier:
    """Wraps a classifier and records the size of every `scores` call; slow enough that requests pile up."""

    def __init__(self, inner, delay: float = 0.05):
        self.inner, self.delay, self.labels = inner, delay, inner.labels
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def scores(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        with self.lock:
            self.calls.append(len(texts))
        time.sleep(self.delay)
        return self.inner.scores(texts, batch_size)


def test_predictions_are_the_classifiers_in_input_order(run_dir, classifier):
    expected = classifier.predict(TEXTS)
    with TestClient(create_app(run_dir)) as client:
        response = client.post("/predict", json={"texts": TEXTS})
        backwards = client.post("/predict", json={"texts": TEXTS[::-1]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == [e.label for e in expected]
    for got, want in zip(predictions, expected):
        assert got["scores"] == pytest.approx(want.scores, abs=1e-6)
        assert sum(got["scores"].values()) == pytest.approx(1, abs=1e-5)
    assert [p["label"] for p in backwards.json()["predictions"]] == [e.label for e in reversed(expected)]


def test_a_single_text_model_refuses_pairs_and_both_kinds_at_once(run_dir):
    with TestClient(create_app(run_dir)) as client:
        pairs = client.post("/predict", json={"pairs": [["a premise", "a hypothesis"]]})
        both = client.post("/predict", json={"texts": ["x"], "pairs": [["a", "b"]]})
        neither = client.post("/predict", json={})
    assert pairs.status_code == 422 and "reads one text per input" in pairs.json()["detail"]
    assert both.status_code == 422 and "reads one text per input" in both.json()["detail"]
    assert neither.status_code == 422


def test_a_runs_schema_offers_only_the_inputs_it_reads(run_dir):
    """schemathesis found `{"pairs": [["", ""]]}` valid by the schema and refused by a single-text run (ST202):
    a run's /predict schema now names its own shape only."""
    with TestClient(create_app(run_dir)) as client:
        schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert set(request["properties"]) == {"texts"} and request["required"] == ["texts"]
    assert request["additionalProperties"] is False and request["properties"]["texts"]["minItems"] == 1


def test_concurrent_requests_share_micro_batches(classifier):
    counting = CountingClassifier(classifier)
    requests = [[f"request {i}: " + TEXTS[i % len(TEXTS)]] + ([f"and more {i}"] if i % 3 == 0 else [])
                for i in range(20)]
    expected = {text: p.label for text, p in zip(sum(requests, []), classifier.predict(sum(requests, [])))}
    barrier = threading.Barrier(len(requests))
    with TestClient(create_app(None, classifier=counting, max_batch=8, batch_wait_ms=20)) as client:
        def post(texts: list[str]):
            barrier.wait()
            return client.post("/predict", json={"texts": texts})

        with ThreadPoolExecutor(len(requests)) as pool:
            responses = list(pool.map(post, requests))
    assert [r.status_code for r in responses] == [200] * len(requests)
    for texts, response in zip(requests, responses):  # each request got its own rows back, in its order
        assert [p["label"] for p in response.json()["predictions"]] == [expected[t] for t in texts]
    assert sum(counting.calls) == sum(map(len, requests))
    assert len(counting.calls) < len(requests), counting.calls
    assert max(counting.calls) <= 8


@pytest.mark.parametrize("limits, kwargs, message", [
    ({"max_texts": 4}, {"json": {"texts": TEXTS}}, "5 texts in one request; the limit is max_texts=4"),
    ({"max_text_chars": 10}, {"json": {"texts": ["ok", "x" * 11]}},
     "text 1 has 11 characters; the limit is max_text_chars=10"),
    ({"max_body_bytes": 1000}, {"json": {"texts": ["x" * 2000]}}, "larger than max_body_bytes=1,000"),
    ({"max_body_bytes": 1000}, {"content": iter([b'{"texts": ["', b"x" * 2000, b'"]}'])},  # chunked, no length
     "larger than max_body_bytes=1,000"),
])
def test_oversized_requests_get_413_naming_the_limit(classifier, limits, kwargs, message):
    with TestClient(create_app(None, classifier=classifier, **limits)) as client:
        response = client.post("/predict", **kwargs)
    assert response.status_code == 413
    assert message in response.json()["detail"]


@pytest.mark.parametrize("kwargs, message", [
    ({"content": b'{"texts": ["unclosed', "headers": {"content-type": "application/json"}}, "invalid JSON"),
    ({"json": {}}, "give either texts or pairs"),
    ({"json": {"text": ["a"]}}, "text: Extra inputs are not permitted"),
    ({"json": {"texts": "a single string"}}, "texts: Input should be a valid list"),
    ({"json": {"texts": ["fine", 3]}}, "texts.1: Input should be a valid string"),
    ({"json": {"texts": []}}, "texts: List should have at least 1 item"),
    ({"json": ["a"]}, "body: Input should be a valid dictionary"),
    ({"content": b'{"texts": ["\\ud800"]}', "headers": {"content-type": "application/json"}},
     "text 0 is not valid Unicode"),
])
def test_malformed_requests_get_422_with_a_message(classifier, kwargs, message):
    with TestClient(create_app(None, classifier=classifier)) as client:
        response = client.post("/predict", **kwargs)
        assert client.post("/predict", json={"texts": ["still serving"]}).status_code == 200
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str) and message in detail, detail


@pytest.mark.parametrize("from_env", [False, True])
def test_bearer_token_guards_predict_and_info_but_not_health(classifier, monkeypatch, from_env):
    if from_env:
        monkeypatch.setenv("AFINAR_SERVE_TOKEN", "s3cret-token")
    app = create_app(None, classifier=classifier, token=None if from_env else "s3cret-token")
    body = {"texts": ["hello"]}
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Bearer s3cret-tokenX"}):
            refused = client.post("/predict", json=body, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.json() == {"detail": "missing or wrong bearer token"}
            assert client.get("/info", headers=headers).status_code == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert client.post("/predict", json=body, headers=good).status_code == 200
        assert client.get("/info", headers=good).status_code == 200
        assert client.get("/health").json() == {"status": "ok", "waiting": 0}


def test_info_reports_run_labels_metrics_and_limits(run_dir, classifier):
    with TestClient(create_app(run_dir, classifier=classifier, max_texts=32)) as client:
        info = client.get("/info").json()
    assert info["run"] == run_dir.name
    assert info["labels"] == ["negative", "neutral", "positive"]
    assert set(info["metrics"]) == {"validation", "test"}
    measured = json.loads((run_dir / "metrics.json").read_text())
    assert info["metrics"]["test"]["n"] == 60 and info["metrics"]["test"]["accuracy"] == measured["test"]["accuracy"]
    assert info["limits"]["max_texts"] == 32 and info["limits"]["max_batch"] == 64


def test_openapi_schema_describes_predict(classifier):
    with TestClient(create_app(None, classifier=classifier, token="t")) as client:
        schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    assert {"200", "401", "413", "422"} <= set(predict["responses"])
    assert {"/health", "/info"} <= set(schema["paths"])
    assert "PredictResponse" in schema["components"]["schemas"]
    # what the schema calls valid, the server accepts: exactly one of texts and pairs, non-empty arrays, never null
    request = schema["components"]["schemas"]["PredictRequest"]
    assert request["oneOf"] == [{"required": ["texts"]}, {"required": ["pairs"]}]
    assert request["additionalProperties"] is False
    for name in ("texts", "pairs"):
        assert request["properties"][name]["type"] == "array" and request["properties"][name]["minItems"] == 1
        assert "anyOf" not in request["properties"][name] and "default" not in request["properties"][name]
    with TestClient(create_app(None, classifier=classifier)) as client:
        null = client.post("/predict", json={"texts": ["fine"], "pairs": None})
    assert null.status_code == 422 and "pairs: Value error, must be a list" in null.json()["detail"]


@pytest.mark.parametrize("kwargs, message", [
    ({"token": ""}, "token is empty"),
    ({"token": "has space"}, "printable ASCII"),
    ({"max_batch": 0}, "max_batch must be at least 1"),
    ({"batch_wait_ms": -1}, "batch_wait_ms must not be negative"),
])
def test_bad_settings_are_refused_before_serving(classifier, kwargs, message):
    with pytest.raises(AfinarError, match=message):
        create_app(None, classifier=classifier, **kwargs)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(AfinarError, match="not an afinar run folder"):
        create_app(tmp_path)


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(classifier):
    class Flaky:
        labels = classifier.labels

        def scores(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
            if "boom" in texts:
                raise RuntimeError("model failure")
            return classifier.scores(texts, batch_size)

    with TestClient(create_app(None, classifier=Flaky()), raise_server_exceptions=False) as client:
        assert client.post("/predict", json={"texts": ["boom"]}).status_code == 500
        assert client.post("/predict", json={"texts": ["fine"]}).status_code == 200


class Slow:
    """A scorer that takes `delay` seconds per batch (a busy or hung model)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.labels = inner, delay, inner.labels

    def scores(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        time.sleep(self.delay)
        return self.inner.scores(texts, batch_size)


def test_an_unauthenticated_body_is_refused_before_it_is_read(classifier):
    """4 MB without the token: 401 at once, not 413 after reading it (the limit here is 1 MB)."""
    app = create_app(None, classifier=classifier, token="s3cret", max_body_bytes=1_000_000)
    with TestClient(app) as client:
        response = client.post("/predict", content=b'{"texts": ["' + b"x" * 4_000_000 + b'"]}',
                               headers={"content-type": "application/json"})
    assert response.status_code == 401 and response.json() == {"detail": "missing or wrong bearer token"}


def test_a_body_that_is_not_utf8_gets_422_with_json_detail(classifier):
    with TestClient(create_app(None, classifier=classifier)) as client:
        response = client.post("/predict", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid UTF-8" in response.json()["detail"]


def test_a_full_queue_sheds_load_with_503_and_retry_after(classifier):
    app = create_app(None, classifier=Slow(classifier, 0.3), max_queue=1, max_batch=1, batch_wait_ms=0)
    with TestClient(app) as client, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: client.post("/predict", json={"texts": [f"text {i}"]}), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert "requests are waiting" in busy.json()["detail"] and busy.headers["retry-after"] == "1"


def test_scoring_past_its_deadline_is_503_and_health_reports_the_stall(classifier):
    app = create_app(None, classifier=Slow(classifier, 1.5), score_timeout_s=0.3)
    with TestClient(app) as client:
        late = client.post("/predict", json={"texts": ["hello"]})
        assert late.status_code == 503 and "score_timeout_s=0.3" in late.json()["detail"]
        time.sleep(0.4)  # the batch has now been scoring for over 2 x score_timeout_s
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "stalled"
        time.sleep(1.0)  # the model answers again
        assert client.get("/health").json() == {"status": "ok", "waiting": 0}


def test_one_bad_request_fails_alone_as_json_not_its_batch(classifier):
    class Flaky:
        labels = classifier.labels

        def scores(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
            time.sleep(0.05)
            if "boom" in texts:
                raise RuntimeError("model failure")
            return classifier.scores(texts, batch_size)

    app = create_app(None, classifier=Flaky(), batch_wait_ms=200)  # both requests land in one batch
    with TestClient(app, raise_server_exceptions=False) as client, ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(lambda texts: client.post("/predict", json={"texts": texts}), (["boom"], ["fine"]))
    assert good.status_code == 200 and len(good.json()["predictions"]) == 1
    assert bad.status_code == 500 and bad.json() == {"detail": "internal error (RuntimeError); see the server log"}


def test_the_public_schema_names_no_run(run_dir, classifier):
    with TestClient(create_app(run_dir, classifier=classifier, token="t")) as client:
        schema = client.get("/openapi.json")
    assert schema.json()["info"]["summary"] == "Text classification with a fine-tuned model"
    assert str(run_dir) not in schema.text


def test_a_reachable_server_without_a_token_warns(classifier, caplog):
    from afinar.serving.http import server

    app = create_app(None, classifier=classifier)
    with caplog.at_level("WARNING", logger="afinar"):
        server(app, "127.0.0.1", 0, None)
        assert not caplog.records
        server(app, "0.0.0.0", 0, None)
    assert "serving on 0.0.0.0 without a token" in caplog.text


def test_half_sent_headers_are_cut_off_and_health_keeps_answering(classifier):
    """Slowloris against a real uvicorn on an ephemeral loopback port: 50 sockets that send half a request are
    closed after `read_timeout_s`; /health answers throughout."""
    import socket

    import httpx

    from afinar.serving.http import server

    app = create_app(None, classifier=classifier, read_timeout_s=1.0)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    running = server(app, "127.0.0.1", port, None, read_timeout_s=1.0, log_level="warning")
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not running.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        sockets = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            sockets.append(s)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "ok"
        time.sleep(2.0)
        closed = 0
        for s in sockets:
            s.settimeout(1)
            try:
                closed += s.recv(1) == b""
            except (ConnectionResetError, socket.timeout):
                closed += 0
            s.close()
        assert closed == 50
        assert httpx.post(f"http://127.0.0.1:{port}/predict", json={"texts": ["ok"]}, timeout=5).status_code == 200
    finally:
        running.should_exit = True
        thread.join(10)
