"""What every afinar server shares: micro-batching, request guards, one-line JSON errors, `GET /health`, uvicorn.

Requests are not scored one by one: a single worker task gathers the texts of concurrent requests into one
micro-batch (up to `max_batch` texts, or whatever arrived within `batch_wait_ms`), scores it once in a worker
thread so the event loop keeps accepting requests, and hands each request its own rows back. One forward pass
over 64 tweets costs little more than one over a single tweet, so under load this multiplies throughput;
with one client it adds at most `batch_wait_ms` of latency.

Bad input is the client's error, never the server's: oversized requests get 413, malformed ones (bodies that
are not UTF-8 JSON included) 422, a missing token 401 before the body is read, each with a one-line
`{"detail": "..."}`; an unexpected failure is a JSON 500 for the request that caused it alone. Exposed, the server
holds: a bounded queue sheds load with 503, scoring has a deadline (503), a body must arrive within
`read_timeout_s` (408), a new connection must send its request headers within the same time or is closed
(slowloris), and uvicorn caps concurrent connections (`limit_concurrency`, 503 above). `/health` answers 503 when
the scoring worker has died or stalled. Request data is only ever held in memory and never names a file.
Nothing here runs at import time; `serving.app.create_app` loads the model, `serving.app.serve` runs uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afinar.core.errors import AfinarError

log = logging.getLogger(__name__)

TOKEN_ENV = "AFINAR_SERVE_TOKEN"
GUARDED_PATHS = ("/predict", "/info", "/v1/models", "/v1/chat/completions", "/v1/completions")
READ_TIMEOUT_S = 10.0  # for a new connection's request headers and for a request's body
# 256 texts of 10,000 ASCII characters fit; anything bigger is refused before it is parsed.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class Scorer(Protocol):
    """What the server needs from a model: `afinar.inference.predictors.Classifier` is one."""

    labels: list[str]

    def scores(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...


class Worker(Protocol):
    """What `base_app` runs for the app's lifetime: `MicroBatcher`, or the generation server's decoding loop."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def state(self) -> str: ...

    def load(self) -> dict[str, int]: ...


class ErrorStyle:
    """How an app words its errors: `{"detail": "..."}`, and 422 for a request the schema refuses (FastAPI's
    convention, the prediction API's). Every error the app sends, the guard's included, goes through `response`."""

    validation_status = 422

    def response(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status, headers=headers)


class HealthResponse(BaseModel):
    status: str = Field(description="ok, or why the server cannot score: stopped, stalled")
    waiting: int | None = Field(default=None, description="Requests queued, not yet being served")
    decoding: int | None = Field(default=None, description="A generating server: requests decoding now")


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
    max_queue: int = 1024
    stall_seconds: float = 60.0
    _queue: asyncio.Queue[_Job] | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _busy_since: float | None = field(default=None, init=False)  # when the batch being scored started

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._work(), name="afinar-micro-batcher")

    def state(self) -> str:
        """ok; stopped when the worker is not running; stalled when one batch has been scoring for longer than
        `stall_seconds` (a hung model)."""
        if self._task is None or self._task.done():
            return "stopped"
        if self._busy_since is not None and asyncio.get_running_loop().time() - self._busy_since > self.stall_seconds:
            return "stalled"
        return "ok"

    def load(self) -> dict[str, int]:
        return {"waiting": self._queue.qsize() if self._queue is not None else 0}

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
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPException(503, f"the server is busy: {self.max_queue:,} requests are waiting; retry later",
                                headers={"Retry-After": "1"}) from None
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
        self._busy_since = asyncio.get_running_loop().time()
        try:
            rows = await asyncio.to_thread(self.scorer.scores, texts, self.max_batch)
        except Exception as exc:
            if len(jobs) == 1:  # the request that caused it fails (500); the worker goes on with the next
                jobs[0].future.set_exception(exc)
            else:  # one bad request must not fail the others that shared its batch: score each alone
                for job in jobs:
                    await self._run([job])
            return
        finally:
            self._busy_since = None
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(rows[start:start + len(job.texts)])
            start += len(job.texts)


class RequestGuard:
    """ASGI middleware, before anything parses a request: a guarded path without the bearer token gets 401
    without its body being read; a body over `max_bytes` gets 413 (a declared Content-Length over the limit
    without reading; otherwise, chunked uploads too, read into memory up to the limit and replayed to the app);
    a body that does not arrive within `read_timeout` seconds gets 408; a JSON body that is not UTF-8 gets 422.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float, token: str | None,
                 errors: ErrorStyle = ErrorStyle()):
        self.app = app
        self.errors = errors
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] in GUARDED_PATHS \
                and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            await self.errors.response(401, "missing or wrong bearer token", code="invalid_api_key",
                                       headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        body = bytearray()
        more = True
        while more and not too_large:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                await self.errors.response(408, f"the request body did not arrive within {self.read_timeout:g} s"
                                           )(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.max_bytes
        if too_large:
            await self.errors.response(413, f"request body is larger than max_body_bytes={self.max_bytes:,}"
                                       )(scope, receive, send)
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await self.errors.response(self.errors.validation_status, f"body: not valid UTF-8 (byte {exc.start}); "
                                       f"send UTF-8 JSON")(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def validation_detail(exc: RequestValidationError) -> str:
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


def resolve_token(token: str | None) -> str | None:
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    elif not token:
        raise AfinarError("the serve token is empty; pass none to serve without authentication")
    if token is not None and not re.fullmatch(r"[\x21-\x7e]+", token):
        raise AfinarError("the serve token must be printable ASCII without spaces (it is sent in an HTTP header)")
    return token


def token_from_file(path: str | Path) -> str:
    """The first line of a file that holds the serve token (kept out of the process list)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AfinarError(f"cannot read the token file {path}: {exc}") from None
    if not lines or not lines[0].strip():
        raise AfinarError(f"the token file {path} is empty")
    return lines[0].strip()


def validation_param(exc: RequestValidationError) -> str | None:
    """The request field the first validation error is about (OpenAI's `param`)."""
    errors = exc.errors()
    where = [str(part) for part in errors[0]["loc"] if part != "body"] if errors else []
    return ".".join(where) if where and errors[0]["type"] != "json_invalid" else None


def base_app(summary: str, worker: Worker, token: str | None, max_body_bytes: int, read_timeout_s: float,
             errors: ErrorStyle = ErrorStyle(), error_model: type[BaseModel] | None = None
             ) -> tuple[FastAPI, list, dict[int | str, dict[str, Any]]]:
    """What every afinar server shares: the worker's lifespan, `RequestGuard`, one-line JSON errors in the app's
    `errors` style (validation errors without echoing the input, 500 per request, HTTP errors such as 404) and
    `/health`; plus the dependencies and error responses a guarded endpoint declares in the schema (bodies of
    `error_model`)."""
    error_model = error_model or ErrorResponse

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await worker.stop()

    # the schema is public (as /health is): it names no run, model or path
    app = FastAPI(title="afinar", summary=summary, lifespan=lifespan)
    app.add_middleware(RequestGuard, max_bytes=max_body_bytes, read_timeout=read_timeout_s, token=token,
                       errors=errors)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return errors.response(errors.validation_status, validation_detail(exc), param=validation_param(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return errors.response(exc.status_code, detail, param=getattr(exc, "param", None),
                               code=getattr(exc, "code", None), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("a request failed: %s: %s", type(exc).__name__, exc)
        return errors.response(500, f"internal error ({type(exc).__name__}); see the server log")

    # `RequestGuard` checks the token before the body is read; this only declares the scheme in the schema
    guarded = [Depends(HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`"))] if token else []
    responses: dict[int | str, dict[str, Any]] = {errors.validation_status: {
        "model": error_model, "description": "Malformed JSON, a missing field, a wrong type, no texts"}}
    if token:
        responses[401] = {"model": error_model, "description": "Missing or wrong bearer token"}

    @app.get("/health", response_model=HealthResponse, response_model_exclude_none=True, responses={
        503: {"model": HealthResponse, "description": "The worker has stopped or stalled"}})
    async def health() -> HealthResponse | JSONResponse:
        """Whether requests can be served; open even when a token is set, so load balancers need no secret."""
        state = worker.state()
        health = HealthResponse(status=state, **worker.load())
        return health if state == "ok" else JSONResponse(health.model_dump(exclude_none=True), status_code=503)

    return app, guarded, responses


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def server(app: FastAPI, host: str, port: int, token: str | None, limit_concurrency: int = 512,
           read_timeout_s: float = READ_TIMEOUT_S, log_level: str = "info"):
    """The uvicorn server for `app`: 503 above `limit_concurrency` connections, and a connection that has not sent
    its request headers within `read_timeout_s` is closed. Warns when it would be reachable without a token."""
    import uvicorn

    if not _loopback(host) and not resolve_token(token):
        log.warning("serving on %s without a token: anyone who can reach it can use the model; set %s",
                    host, TOKEN_ENV)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         limit_concurrency=limit_concurrency,
                                         timeout_keep_alive=max(1, round(read_timeout_s)),
                                         http=header_deadline_protocol()))


def header_deadline_protocol() -> type:
    """uvicorn's h11 protocol with a deadline (`timeout_keep_alive` seconds) for a new connection's first request
    headers: a client that opens a socket and trickles or never finishes its headers (slowloris) is closed instead
    of held forever. uvicorn's own keep-alive timer cannot do it: any received byte cancels it."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.header_deadline = self.loop.call_later(self.timeout_keep_alive, self._headers_too_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None:  # the first request's headers are complete
                self.header_deadline.cancel()

        def connection_lost(self, exc: Exception | None) -> None:
            self.header_deadline.cancel()
            super().connection_lost(exc)

        def _headers_too_late(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11
