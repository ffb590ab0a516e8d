"""The HTTP API in-process: predictions as the library makes them, micro-batching, limits, auth, schema."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from afinar.classify import load_run_classifier, train
from afinar.config import load_config
from afinar.errors import AfinarError
from afinar.serve import create_app
from conftest import tweet_rows
from test_classify import tiny_overrides

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
    return load_run_classifier(run_dir)[1]


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
    ({"json": {}}, "texts: Field required"),
    ({"json": {"text": ["a"]}}, "texts: Field required"),
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
        assert client.get("/health").json() == {"status": "ok"}


def test_info_reports_run_labels_metrics_and_limits(run_dir, classifier):
    with TestClient(create_app(run_dir, classifier=classifier, max_texts=32)) as client:
        info = client.get("/info").json()
    assert info["run"] == run_dir.name
    assert info["labels"] == ["negative", "neutral", "positive"]
    assert set(info["metrics"]) == {"validation", "test"}
    assert info["metrics"]["test"]["n"] == 60 and 0 <= info["metrics"]["test"]["accuracy"] <= 1
    assert info["limits"]["max_texts"] == 32 and info["limits"]["max_batch"] == 64


def test_openapi_schema_describes_predict(classifier):
    with TestClient(create_app(None, classifier=classifier, token="t")) as client:
        schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    assert {"200", "401", "413", "422"} <= set(predict["responses"])
    assert {"/health", "/info"} <= set(schema["paths"])
    assert "PredictResponse" in schema["components"]["schemas"]


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
