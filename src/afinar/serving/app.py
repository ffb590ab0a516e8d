"""`afinar serve`: the app a finished run gets, chosen by what its task does. A task that generates is served by
the OpenAI-compatible API (`serving.openai`); any other by the prediction API (`serving.predict`) over the
predictor the task loads for its runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.serving.http import DEFAULT_MAX_BODY_BYTES, READ_TIMEOUT_S, resolve_token, server
from afinar.serving.openai import DEFAULT_MAX_TOKENS_CAP, create_generation_app
from afinar.serving.predict import Scorer, create_predict_app
from afinar.tasks import registry


def create_app(run_dir: str | Path | None, token: str | None = None, max_batch: int | None = None,
               max_texts: int = 256, max_text_chars: int = 10_000, batch_wait_ms: float = 5.0,
               classifier: Scorer | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, backend: str = "auto",
               max_queue: int | None = None, score_timeout_s: float | None = None,
               read_timeout_s: float = READ_TIMEOUT_S, max_tokens: int = DEFAULT_MAX_TOKENS_CAP) -> FastAPI:
    """The API for the finished run in `run_dir`; its model is loaded now, so a bad run fails before serving.

    `classifier` replaces the run's model (tests pass a wrapper; `run_dir` may then be None and /info reports no
    run). `token`, or else the `AFINAR_SERVE_TOKEN` environment variable, guards every endpoint but /health.
    `backend` is `inference.predictors`' choice; `auto` serves the int8 ONNX export when its recorded accuracy
    change is within tolerance (its activation scales are per batch, so a score can shift slightly with batch
    company).

    A generating run gets the OpenAI-compatible API instead (`serving.openai`), where `max_batch` is the number of
    requests decoding together (default 16), `max_queue` the requests that may wait (default 64),
    `score_timeout_s` a request's generation deadline (default 120) and `max_tokens` the most new tokens a request
    may ask for; the prediction API's defaults are 64 texts, 1,024 requests and 30 s.
    """
    run = Run.open(run_dir) if run_dir is not None else None
    task = registry.for_run(run) if run is not None and classifier is None else None
    generates = task is not None and task.generates
    max_batch = (16 if generates else 64) if max_batch is None else max_batch
    max_queue = (64 if generates else 1024) if max_queue is None else max_queue
    score_timeout_s = (120.0 if generates else 30.0) if score_timeout_s is None else score_timeout_s
    for name, value in (("max_batch", max_batch), ("max_texts", max_texts), ("max_text_chars", max_text_chars),
                        ("max_body_bytes", max_body_bytes), ("max_queue", max_queue), ("max_tokens", max_tokens)):
        if value < 1:
            raise AfinarError(f"{name} must be at least 1, got {value}")
    for name, seconds in (("score_timeout_s", score_timeout_s), ("read_timeout_s", read_timeout_s)):
        if not seconds > 0:
            raise AfinarError(f"{name} must be greater than 0, got {seconds}")
    if batch_wait_ms < 0:
        raise AfinarError(f"batch_wait_ms must not be negative, got {batch_wait_ms}")
    token = resolve_token(token)
    if classifier is None:
        if run is None or task is None:
            raise AfinarError("create_app needs a run folder or a classifier")
        run.require_finished()
        if generates:
            if backend not in ("auto", "torch"):
                raise AfinarError(f"backend {backend}: a {task.name} run generates with torch only")
            return create_generation_app(run.path, token, max_text_chars=max_text_chars,
                                         max_body_bytes=max_body_bytes, max_queue=max_queue,
                                         timeout_s=score_timeout_s, read_timeout_s=read_timeout_s,
                                         max_tokens=max_tokens, max_batch=max_batch)
        classifier = task.load_predictor(run, backend)
    return create_predict_app(run, classifier, token, max_batch, max_texts, max_text_chars, batch_wait_ms,
                              max_body_bytes, max_queue, score_timeout_s, read_timeout_s)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          log_level: str = "info", limit_concurrency: int = 512, **limits: Any) -> None:
    """Serve the run over HTTP until interrupted; loopback only unless `host` says otherwise.

    `limits` are `create_app`'s keyword arguments (max_batch, max_texts, max_text_chars, batch_wait_ms,
    max_body_bytes, max_queue, score_timeout_s, read_timeout_s, max_tokens).
    """
    app = create_app(run_dir, token=token, **limits)
    server(app, host, port, token, limit_concurrency, limits.get("read_timeout_s", READ_TIMEOUT_S), log_level).run()


