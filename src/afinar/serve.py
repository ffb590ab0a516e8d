"""An HTTP JSON API over a finished run: `POST /predict`, `GET /info`, `GET /health`.

Requests are not scored one by one: a single worker task gathers the texts of concurrent requests into one
micro-batch (up to `max_batch` texts, or whatever arrived within `batch_wait_ms`), scores it once in a worker
thread so the event loop keeps accepting requests, and hands each request its own rows back. One forward pass
over 64 tweets costs little more than one over a single tweet, so under load this multiplies throughput;
with one client it adds at most `batch_wait_ms` of latency.

Bad input is the client's error, never the server's: oversized requests get 413, malformed ones 422, each
with a one-line `{"detail": "..."}`. Request data is only ever held in memory and never names a file.
Nothing here runs at import time; `create_app` loads the model, `serve` runs uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afinar.classify import load_run_classifier
from afinar.errors import AfinarError
from afinar.runs import Run

TOKEN_ENV = "AFINAR_SERVE_TOKEN"
# 256 texts of 10,000 ASCII characters fit; anything bigger is refused before it is parsed.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class Scorer(Protocol):
    """What the server needs from a model: `afinar.inference.Classifier` is one."""

    labels: list[str]

    def scores(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, description="Texts to classify; predictions come back in this order.")

    @field_validator("texts")
    @classmethod
    def _encodable(cls, texts: list[str]) -> list[str]:
        """JSON can carry lone surrogates (`"\\ud800"`); the tokenizer would fail on them mid-batch and take the
        other requests sharing that batch down with it, so they are refused here, per request."""
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"text {i} is not valid Unicode (it holds a lone surrogate)") from None
        return texts


class ScoredLabel(BaseModel):
    label: str = Field(description="The most probable label.")
    scores: dict[str, float] = Field(description="Probability of every label; they sum to 1.")


class PredictResponse(BaseModel):
    predictions: list[ScoredLabel]


class HealthResponse(BaseModel):
    status: str


class Limits(BaseModel):
    max_batch: int = Field(description="Most texts scored in one forward pass, across requests.")
    max_texts: int = Field(description="Most texts in one request.")
    max_text_chars: int = Field(description="Most characters in one text.")
    max_body_bytes: int = Field(description="Largest request body.")
    batch_wait_ms: float = Field(description="How long the first request of a batch waits for company.")


class InfoResponse(BaseModel):
    run: str | None = Field(description="The run folder's name.")
    model: str | None = Field(description="The base model the run fine-tuned.")
    labels: list[str]
    backend: str | None = Field(default=None, description="What computes predictions: torch, onnx or onnx-int8.")
    metrics: dict[str, Any] = Field(description="The run's validation and test metrics, as in metrics.json.")
    limits: Limits


class ErrorResponse(BaseModel):
    detail: str


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[np.ndarray]


@dataclass
class MicroBatcher:
    """Queues the texts of concurrent requests and scores them together, one batch at a time.

    One worker, so the model is never run by two threads at once; the queue is created in `start` because
    it belongs to the event loop that runs the app (a test client may start a fresh loop each time).
    """

    scorer: Scorer
    max_batch: int
    wait_seconds: float
    _queue: asyncio.Queue[_Job] | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="afinar-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._queue = self._task = None

    async def scores(self, texts: list[str]) -> np.ndarray:
        """Probabilities for `texts`, one row each, once the batch they joined has been scored."""
        if self._queue is None:
            raise RuntimeError("the micro-batching worker is not running: serve the app with its lifespan "
                               "(uvicorn does; in tests use `with TestClient(app)`)")
        job = _Job(texts, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _work(self) -> None:
        """Until cancelled: take the oldest job, add more until the batch is full or the wait is over, score."""
        assert self._queue is not None
        jobs: list[_Job] = []
        carry: _Job | None = None
        try:
            while True:
                jobs = [carry or await self._queue.get()]
                carry, size = None, len(jobs[0].texts)
                deadline = asyncio.get_running_loop().time() + self.wait_seconds
                while size < self.max_batch:
                    job = await self._next(deadline)
                    if job is None:
                        break
                    if size + len(job.texts) > self.max_batch:
                        carry = job  # it opens the next batch rather than overfilling this one
                        break
                    jobs.append(job)
                    size += len(job.texts)
                await self._run(jobs)
        finally:  # stopping: no request is left waiting forever (cancelling a finished future does nothing)
            waiting = jobs + ([carry] if carry else [])
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
            for job in waiting:
                job.future.cancel()

    async def _next(self, deadline: float) -> _Job | None:
        """The next queued job: at once if one is waiting, else the first to arrive before `deadline`."""
        assert self._queue is not None
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                return None
            try:
                return await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                return None

    async def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # a request cancelled while it waited
        if not jobs:
            return
        texts = [text for job in jobs for text in job.texts]
        try:
            rows = await asyncio.to_thread(self.scorer.scores, texts, self.max_batch)
        except Exception as exc:  # the requests in this batch fail (500); the worker goes on with the next
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(rows[start:start + len(job.texts)])
            start += len(job.texts)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 before anything parses it.

    A declared Content-Length over the limit is refused without reading; otherwise (chunked uploads too) the
    body is read into memory up to the limit and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        body = bytearray()
        more = True
        while more and not too_large:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.max_bytes
        if too_large:
            await JSONResponse({"detail": f"request body is larger than max_body_bytes={self.max_bytes:,}"},
                               status_code=413)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's error list as one line, without echoing the input back (it may be megabytes of text)."""
    errors = exc.errors()
    parts = []
    for error in errors[:3]:
        where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
        if error["type"] == "json_invalid":
            where, message = "body", f"invalid JSON at character {error['loc'][-1]}: {error['ctx']['error']}"
        else:
            message = error["msg"]
        parts.append(f"{where}: {message}")
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    return "; ".join(parts)


def _resolve_token(token: str | None) -> str | None:
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    elif not token:
        raise AfinarError("the serve token is empty; pass none to serve without authentication")
    if token is not None and not re.fullmatch(r"[\x21-\x7e]+", token):
        raise AfinarError("the serve token must be printable ASCII without spaces (it is sent in an HTTP header)")
    return token


def _bearer_check(token: str) -> Callable[..., Awaitable[None]]:
    """A dependency that lets a request through only with `Authorization: Bearer <token>`."""
    expected = token.encode()
    bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):  # constant time: the comparison leaks no prefix
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(run_dir: str | Path | None, token: str | None = None, max_batch: int = 64, max_texts: int = 256,
               max_text_chars: int = 10_000, batch_wait_ms: float = 5.0, classifier: Scorer | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, backend: str = "auto") -> FastAPI:
    """The API for the finished run in `run_dir`; its model is loaded now, so a bad run fails before serving.

    `classifier` replaces the run's model (tests pass a wrapper; `run_dir` may then be None and /info reports no
    run). `token`, or else the `AFINAR_SERVE_TOKEN` environment variable, guards /predict and /info.
    `backend` is `inference`'s choice; `auto` serves the int8 ONNX export when its recorded accuracy change is
    within tolerance (its activation scales are per batch, so a score can shift slightly with batch company).
    """
    for name, value in (("max_batch", max_batch), ("max_texts", max_texts), ("max_text_chars", max_text_chars),
                        ("max_body_bytes", max_body_bytes)):
        if value < 1:
            raise AfinarError(f"{name} must be at least 1, got {value}")
    if batch_wait_ms < 0:
        raise AfinarError(f"batch_wait_ms must not be negative, got {batch_wait_ms}")
    token = _resolve_token(token)
    run = None
    if classifier is None:
        if run_dir is None:
            raise AfinarError("create_app needs a run folder or a classifier")
        run, classifier = load_run_classifier(run_dir, backend)
    elif run_dir is not None:
        run = Run.open(run_dir)
    labels = list(classifier.labels)
    metrics = {split: scores for split, scores in (run.metrics() if run else {}).items()
               if split in ("validation", "test")}
    info = InfoResponse(run=run.path.name if run else None, model=run.config().model.name if run else None,
                        labels=labels, metrics=metrics, backend=getattr(classifier, "backend", None),
                        limits=Limits(max_batch=max_batch, max_texts=max_texts, max_text_chars=max_text_chars,
                                      max_body_bytes=max_body_bytes, batch_wait_ms=batch_wait_ms))
    batcher = MicroBatcher(classifier, max_batch, batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="afinar", summary=f"Text classification with {info.run or 'a fine-tuned model'}",
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    guarded = [Depends(_bearer_check(token))] if token else []
    errors: dict[int | str, dict[str, Any]] = {
        422: {"model": ErrorResponse, "description": "Malformed JSON, a missing field, a wrong type, no texts"}}
    if token:
        errors[401] = {"model": ErrorResponse, "description": "Missing or wrong bearer token"}

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        """Liveness; open even when a token is set, so load balancers need no secret."""
        return HealthResponse(status="ok")

    @app.get("/info", response_model=InfoResponse, dependencies=guarded, responses=errors)
    async def get_info() -> InfoResponse:
        """The run, its labels, its validation and test metrics, and the request limits."""
        return info

    @app.post("/predict", response_model=PredictResponse, dependencies=guarded, responses={
        **errors, 413: {"model": ErrorResponse, "description": "Too many texts, a text or the body too long"}})
    async def predict(request: PredictRequest) -> PredictResponse:
        """The most probable label and every label's probability for each text, in input order."""
        if len(request.texts) > max_texts:
            raise HTTPException(413, f"{len(request.texts):,} texts in one request; the limit is "
                                     f"max_texts={max_texts:,}")
        for i, text in enumerate(request.texts):
            if len(text) > max_text_chars:
                raise HTTPException(413, f"text {i} has {len(text):,} characters; the limit is "
                                         f"max_text_chars={max_text_chars:,}")
        rows = await batcher.scores(request.texts)
        return PredictResponse(predictions=[
            ScoredLabel(label=labels[int(row.argmax())], scores=dict(zip(labels, row.tolist()))) for row in rows])

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          log_level: str = "info", **limits: Any) -> None:
    """Serve the run over HTTP until interrupted; loopback only unless `host` says otherwise.

    `limits` are `create_app`'s keyword arguments (max_batch, max_texts, max_text_chars, batch_wait_ms,
    max_body_bytes).
    """
    import uvicorn

    uvicorn.run(create_app(run_dir, token=token, **limits), host=host, port=port, log_level=log_level)
