"""OpenAI-compatible endpoints over a finished causal_lm or sft run: `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health`.

What clients of OpenAI's API rely on works as they expect: the official `openai` client and LangChain's
`ChatOpenAI` talk to it (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN)`), with or without streaming.
- Streaming (`stream: true`): server-sent events, `data: {chunk}` with `delta`s (chat) or `text` pieces
  (completions), a last chunk with `finish_reason`, a usage chunk when `stream_options.include_usage`, then
  `data: [DONE]`. The streamed pieces concatenate to exactly the text the same request gets without streaming.
- `stop` (a string or up to 4): the text ends before the first stop string, which is not returned (as OpenAI);
  `max_completion_tokens` is `max_tokens`' current name (both sent: the smaller); both are capped server-wide (`--max-tokens`, 400 above).
- Any other field that would change the output is refused with a 400 naming it (penalties, `logit_bias`,
  `logprobs`, `n` > 1, `response_format` other than text, tools, `echo`, `suffix`, ...), never ignored; fields that
  change nothing (`user`, `metadata`, `store`, `service_tier`, `stream_options`) are accepted; an unknown field is
  refused. One extension: `ignore_eos` (vLLM's name) decodes `max_tokens` tokens whatever the model says, for
  load tests. Errors are OpenAI's envelope `{"error": {"message", "type", "param", "code"}}` with its status codes:
  400 (a prompt longer than the model: code `context_length_exceeded`), 401, 404 (an unknown model name: code
  `model_not_found`), 413 (a body too large), 429 with Retry-After (the queue is full, or no row came free in
  time), 503 with Retry-After (generation ran past its deadline), 500.
- Concurrency: requests decode together in one continuous batch (`serving.engine`), each with its own sampling
  settings and seed; a request whose client disconnects, or whose generation deadline passes, stops at the next
  token and frees its row.

Prompts are rendered under the format the model was trained with (`inference.generation`): chat messages through
the saved chat template, with the trained system prompt when the client sends none; an sft run's
`/v1/completions` prompt is the user text training wrapped in `sft.template`. A prompt and seed give the text
`afinar generate` gives (alone in the batch; beside other requests a seeded sample can differ in rare near-ties).
The server shares `/predict`'s protections (`serving.http.base_app`: the bearer token checked before the body is
read, body size and read-time limits, `/health`).
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.inference.generation import (
    MAX_NEW_TOKENS,
    MAX_SEED,
    SEED,
    TEMPERATURE,
    TOP_P,
    Generator,
    Sampling,
    Sequence,
)
from afinar.serving.engine import Busy, DecodingLoop, Events, QueueTimeout, Stopped
from afinar.serving.http import ErrorStyle, base_app
from afinar.tasks import registry

MAX_STOP_STRINGS = 4  # as OpenAI
DISCONNECT_CHECK_S = 0.25  # how often a request waiting for its whole answer looks whether its client left
DEFAULT_MAX_TOKENS_CAP = 4096


class APIError(HTTPException):
    """An error in OpenAI's terms: the status, and the request field (`param`) and `code` it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.param, self.code = param, code


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                                                   "invalid_request_error"),
                      "param": param, "code": code}}


class OpenAIErrors(ErrorStyle):
    """OpenAI's error envelope, and 400 for a request the schema refuses."""

    validation_status = 400

    def response(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message as clients send it: `content` a string or a list of text parts; `developer` is OpenAI's newer
    name for the system role. Names are accepted and not shown to the model (its template has no place for them)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_chat(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="Only text: json_object and json_schema are not supported.")


# a boolean that may only be false (a feature this server lacks): JSON's 0 is not false
OnlyFalse = Annotated[StrictBool | None, WithJsonSchema({"anyOf": [{"type": "boolean", "const": False},
                                                                   {"type": "null"}]})]


def _unsupported(field: str, why: str) -> str:
    return f"{field} is not supported by this server ({why}); leave it out"


# fields that would change the output and this server does not do: accepted only at their neutral value
NEUTRAL = {"frequency_penalty": (0, "penalties are not applied"), "presence_penalty": (0, "penalties are not applied"),
           "logit_bias": ({}, "logits are not biased"), "logprobs": (False, "log-probabilities are not returned"),
           "top_logprobs": (0, "log-probabilities are not returned"), "tools": ([], "the model calls no tools"),
           "functions": ([], "the model calls no functions"), "echo": (False, "the prompt is not echoed"),
           "suffix": ("", "text is not inserted"), "best_of": (1, "one candidate is sampled"),
           "audio": (None, "text only"), "prediction": (None, "no predicted outputs"),
           "reasoning_effort": (None, "not a reasoning model"), "web_search_options": (None, "no web search")}


class _Sampling(BaseModel):
    """What both endpoints share. What the schema calls invalid the server refuses (JSON's `true` or `"5"` is not
    a number, though pydantic's lax mode would take them); an unknown field is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The served model's name (GET /v1/models).")
    max_tokens: int | None = Field(default=None, ge=1, description=f"New tokens at most (default {MAX_NEW_TOKENS}); "
                                   f"cut to the positions the model has left after the prompt (finish_reason length).")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="The current name of max_tokens (both "
                                                                              "sent: the smaller).")
    temperature: float | None = Field(default=TEMPERATURE, ge=0, le=2, description="0 decodes greedily.")
    top_p: float | None = Field(default=TOP_P, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Same seed, same answer (as afinar "
                             f"generate, whose default is {SEED}); left out or null: unseeded, as OpenAI's API.")
    stream: StrictBool | None = Field(default=False, description="Server-sent events, ending with data: [DONE].")
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=1, description="One choice per request.")
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None = \
        Field(default=None, description=f"A string or up to {MAX_STOP_STRINGS}; the text ends before the first, which "
                                        f"is not returned.")
    ignore_eos: StrictBool | None = Field(default=False, description="An extension (vLLM's name): generate max_tokens "
                                   "tokens whatever the model's end-of-answer token says, for load tests; stop strings "
                                   "still apply.")
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    frequency_penalty: float | None = Field(default=None, ge=0, le=0, description="Not supported: 0 or null.")
    presence_penalty: float | None = Field(default=None, ge=0, le=0, description="Not supported: 0 or null.")
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0, description="Not supported: {} or null.")

    @model_validator(mode="before")
    @classmethod
    def _json_types(cls, data: Any) -> Any:
        if isinstance(data, dict):
            numbers = [key for key in ("max_tokens", "max_completion_tokens", "seed", "n", "temperature", "top_p",
                                       "frequency_penalty", "presence_penalty", "top_logprobs", "best_of")
                       if isinstance(data.get(key), (bool, str))]
            if numbers:
                raise ValueError(f"{numbers[0]} must be a number, not {data[numbers[0]]!r}")
        return data

    @field_validator("frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "tools",
                     "functions", "echo", "suffix", "best_of", "audio", "prediction", "reasoning_effort",
                     "web_search_options", mode="before", check_fields=False)
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        """A feature this server lacks, asked for: refused with why (before the schema's own, vaguer, check)."""
        neutral, why = NEUTRAL[info.field_name]
        if value is not None and value is not False and (value is True or value != neutral):
            raise ValueError(_unsupported(info.field_name, why))
        return value

    @field_validator("response_format", mode="before", check_fields=False)
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "text"):
            raise ValueError(_unsupported(f"response_format {value['type']}", "the model writes free text"))
        return value

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool) and value != 1:
            raise ValueError("n must be 1: this server returns one choice per request")
        return value

    def sampling(self, default_max_tokens: int) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        asked = [n for n in (self.max_tokens, self.max_completion_tokens) if n is not None]
        return Sampling(min(asked) if asked else default_max_tokens,  # both are "at most"
                        TEMPERATURE if self.temperature is None else self.temperature,
                        TOP_P if self.top_p is None else self.top_p, self.seed, tuple(s for s in stops if s),
                        bool(self.ignore_eos))


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: OnlyFalse = Field(default=None, description="Not supported: false or null.")
    top_logprobs: int | None = Field(default=None, ge=0, le=0, description="Not supported: 0 or null.")
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=0, description="Not supported: [] or null.")
    tool_choice: Literal["none", "auto"] | None = Field(default=None, description="No tools: none or auto.")
    parallel_tool_calls: StrictBool | None = None
    functions: list[dict[str, Any]] | None = Field(default=None, max_length=0, description="Not supported: [] or "
                                                                                           "null.")
    modalities: list[Literal["text"]] | None = None
    audio: None = Field(default=None, description="Not supported: null.")
    prediction: None = Field(default=None, description="Not supported: null.")
    reasoning_effort: None = Field(default=None, description="Not supported: null.")
    web_search_options: None = Field(default=None, description="Not supported: null.")


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1, description="Text to continue (a causal_lm run) or to answer (an sft run).")
    logprobs: int | None = Field(default=None, ge=0, le=0, description="Not supported: 0 or null.")
    echo: OnlyFalse = Field(default=None, description="Not supported: false or null.")
    suffix: str | None = Field(default=None, max_length=0, description="Not supported: empty or null.")
    best_of: int | None = Field(default=None, ge=1, le=1, description="Not supported: 1 or null.")

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_number(cls, value: Any) -> Any:
        if isinstance(value, bool | str):
            raise ValueError(f"logprobs must be a number, not {value!r}")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "afinar"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def for_server(request_model: type[_Sampling], name: str, cap: int) -> type[_Sampling]:
    """`request_model` whose schema names the one model served (any other name is a 404, as OpenAI answers) and
    says this server's token cap."""
    budget = (int | None, Field(default=None, ge=1, le=cap, description=f"New tokens at most (default "
                                f"{min(MAX_NEW_TOKENS, cap)}, at most {cap} on this server); cut to the positions the "
                                f"model has left after the prompt (finish_reason length)."))
    model = (str, Field(description="The served model's name (GET /v1/models).", json_schema_extra={"enum": [name]}))
    return create_model(request_model.__name__, __base__=request_model, model=model, max_tokens=budget,
                        max_completion_tokens=budget)


def usage(seq: Sequence) -> Usage:
    return Usage(prompt_tokens=seq.prompt_tokens, completion_tokens=seq.completion_tokens,
                 total_tokens=seq.prompt_tokens + seq.completion_tokens)


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def create_generation_app(run_dir: str | Path, token: str | None, max_text_chars: int = 10_000,
                          max_body_bytes: int = 4 * 1024 * 1024, max_queue: int = 64, timeout_s: float = 120.0,
                          read_timeout_s: float = 10.0, max_tokens: int = DEFAULT_MAX_TOKENS_CAP,
                          max_batch: int = 16, queue_timeout_s: float = 60.0,
                          generator: Generator | None = None) -> FastAPI:
    """The OpenAI-compatible API for the finished causal_lm or sft run in `run_dir` (its model loaded now).

    `max_batch` requests decode together; `max_queue` more may wait, each at most `queue_timeout_s`; a request has
    `timeout_s` of generation; `max_tokens` caps what a request may ask for."""
    run = Run.open(run_dir)
    run.require_finished()
    task = registry.for_run(run)
    if not task.generates:
        raise AfinarError(f"{run.path} is a {task.name} run, which does not generate; the OpenAI-compatible "
                          f"endpoints serve runs of tasks that do")
    if max_tokens < 1:
        raise AfinarError(f"max_tokens must be at least 1, got {max_tokens}")
    generator = generator or Generator.for_run(run, task.chat_prompts)
    name = run.path.name
    default_max_tokens = min(MAX_NEW_TOKENS, max_tokens)
    loop = DecodingLoop(generator, max_batch, max_queue, queue_timeout_s, stall_seconds=max(60.0, timeout_s))
    errors = OpenAIErrors()
    app, guarded, responses = base_app(f"OpenAI-compatible generation with a fine-tuned {task.name} model", loop,
                                       token, max_body_bytes, read_timeout_s, errors, ErrorEnvelope)
    responses = {**responses,
                 404: {"model": ErrorEnvelope, "description": "Unknown model name"},
                 413: {"model": ErrorEnvelope, "description": "Request body too large"},
                 429: {"model": ErrorEnvelope, "description": "Too many requests waiting (see Retry-After)"},
                 503: {"model": ErrorEnvelope, "description": "Generation ran past its deadline"}}
    event = {"type": "object", "required": ["data"], "properties": {"event": {"type": "string"}, "data": {
        "type": "string", "description": "A chunk (chat.completion.chunk or text_completion) as JSON, an error "
                                        "envelope as JSON, or [DONE] to end the stream"}}}
    streamed = {200: {"content": {"text/event-stream": {"schema": event}},
                      "description": "JSON, or server-sent events when stream is true"}}
    chat_request = for_server(ChatCompletionRequest, name, max_tokens)
    completion_request = for_server(CompletionRequest, name, max_tokens)

    def check(request: _Sampling) -> None:
        if request.model != name:
            raise APIError(404, f"the model {request.model!r} does not exist here; this server serves {name!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")

    def text_limit(text: str, what: str) -> None:
        if len(text) > max_text_chars:
            raise APIError(413, f"{what} has {len(text):,} characters; the limit is max_text_chars={max_text_chars:,}",
                           param=what.split(" ")[0])

    def submit(prompt_ids: list[int], request: _Sampling) -> tuple[Sequence, Events]:
        events = Events()
        try:
            seq = generator.sequence(prompt_ids, request.sampling(default_max_tokens), time_limit_s=timeout_s,
                                     on_text=events.on_text, on_finish=events.on_finish)
        except AfinarError as exc:
            raise APIError(400, str(exc), param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded") from None
        try:
            loop.submit(seq)
        except Busy as exc:
            raise APIError(429, str(exc), code="server_busy", headers={"Retry-After": "1"}) from None
        except Stopped as exc:
            raise APIError(503, str(exc), code="server_stopped", headers={"Retry-After": "5"}) from None
        return seq, events

    def failure(seq: Sequence) -> APIError | None:
        """The error a finished sequence ends its request with, if any."""
        if isinstance(seq.error, QueueTimeout):
            return APIError(429, str(seq.error), code="queue_timeout", headers={"Retry-After": "1"})
        if seq.error is not None:
            return APIError(500, f"generation failed ({type(seq.error).__name__}); see the server log")
        if seq.finish_reason == "cancelled":
            return APIError(400, "the request was cancelled before its answer was complete")
        if seq.finish_reason == "timeout":
            return APIError(503, f"generation took longer than the server's {timeout_s:g} s deadline; ask for fewer "
                                 f"tokens or stream", code="timeout", headers={"Retry-After": "1"})
        return None

    async def finished(seq: Sequence, events: Events, http: Request) -> Sequence:
        """Wait for the whole answer; a client that goes away cancels it (its row is freed at the next token). A
        request never waits longer than its queue time and deadline allow, even if the decoding thread died."""
        check_at = time.monotonic() + DISCONNECT_CHECK_S
        give_up = time.monotonic() + queue_timeout_s + timeout_s + 30
        try:
            while True:
                try:
                    if await asyncio.wait_for(events.queue.get(), DISCONNECT_CHECK_S) is None:
                        break
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() >= check_at:  # pieces may arrive faster than the check: look on a clock
                    check_at = time.monotonic() + DISCONNECT_CHECK_S
                    if await http.is_disconnected():
                        raise APIError(400, "the client went away")  # nobody reads it; the row is freed below
                if time.monotonic() > give_up:
                    raise APIError(503, "the answer did not come (see the server log); retry later",
                                   code="server_stopped", headers={"Retry-After": "5"})
        finally:
            seq.cancel()  # nothing if it finished; a request cancelled any other way must not keep decoding
        error = failure(seq)
        if error is not None:
            raise error
        return seq

    def streaming(seq: Sequence, events: Events, request: _Sampling, chunk: Any) -> StreamingResponse:
        """Server-sent events: `chunk(text, finish_reason)` for each piece, then usage and [DONE]. Starlette cancels
        the generator when the client disconnects, which cancels the sequence."""
        async def body() -> AsyncIterator[bytes]:
            try:
                first = chunk(None, None)
                if first is not None:
                    yield sse(first)
                while (delta := await events.queue.get()) is not None:
                    yield sse(chunk(delta, None))
                error = failure(seq)
                if error is not None:
                    yield sse(error_body(error.status_code, error.detail, error.param, error.code))
                else:
                    yield sse(chunk("", seq.finish_reason))
                    if request.stream_options is not None and request.stream_options.include_usage:
                        yield sse({**chunk("", None), "choices": [], "usage": usage(seq).model_dump()})
                yield sse("[DONE]")
            finally:
                seq.cancel()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded, responses=responses)
    async def models() -> ModelList:
        """The one model this server serves."""
        return ModelList(data=[ModelCard(id=name, created=int(run.path.stat().st_mtime))])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=guarded,
              responses={**responses, **streamed})
    async def chat_completions(request: chat_request, http: Request) -> Any:  # type: ignore[valid-type]
        """An answer to the conversation, rendered through the run's saved chat template (with the trained system
        prompt when the conversation opens without one)."""
        check(request)
        messages = [m.as_chat() for m in request.messages]
        for i, message in enumerate(messages):
            text_limit(message["content"], f"messages {i}")
        try:
            prompt_ids = generator.format.chat_ids(generator.tokenizer, messages)
        except (AfinarError, TemplateError) as exc:  # e.g. a template that wants roles to alternate
            raise APIError(400, f"messages: the model's chat template refused them: {exc}", param="messages") from None
        seq, events = submit(prompt_ids, request)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            def chunk(delta: str | None, finish_reason: str | None) -> dict:
                choice = {"index": 0, "delta": {"role": "assistant", "content": ""} if delta is None else
                          ({"content": delta} if delta else {}), "finish_reason": finish_reason, "logprobs": None}
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [choice]}

            return streaming(seq, events, request, chunk)
        seq = await finished(seq, events, http)
        return ChatCompletion(id=ident, created=created, model=name, usage=usage(seq), choices=[
            ChatChoice(index=0, message=AssistantMessage(content=seq.text), finish_reason=seq.finish_reason)])

    @app.post("/v1/completions", response_model=Completion, dependencies=guarded,
              responses={**responses, **streamed})
    async def completions(request: completion_request, http: Request) -> Any:  # type: ignore[valid-type]
        """A causal_lm run continues the prompt; an sft run answers it as the user text it trained on (wrapped in
        its `sft.template`, after its system prompt, through its chat template)."""
        check(request)
        text_limit(request.prompt, "prompt")
        try:
            prompt_ids = generator.format.prompt_ids(generator.tokenizer, request.prompt)
        except AfinarError as exc:
            raise APIError(400, f"prompt: {exc}", param="prompt") from None
        seq, events = submit(prompt_ids, request)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            def chunk(delta: str | None, finish_reason: str | None) -> dict | None:
                if delta is None:
                    return None
                return {"id": ident, "object": "text_completion", "created": created, "model": name,
                        "choices": [{"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}]}

            return streaming(seq, events, request, chunk)
        seq = await finished(seq, events, http)
        return Completion(id=ident, created=created, model=name, usage=usage(seq), choices=[
            CompletionChoice(index=0, text=seq.text, finish_reason=seq.finish_reason)])

    return app


__all__ = ["create_generation_app"]
