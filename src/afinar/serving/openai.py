"""OpenAI-compatible endpoints over a finished causal_lm or sft run: `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health`.

The official `openai` client works against it (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN)`).
Prompts are rendered and sampled by `inference.generation`, as `afinar generate` does, under the format the model
was trained with: chat messages go through the saved chat template, with the trained system prompt when the
client sends none; an sft run's `/v1/completions` prompt is the user text training wrapped in `sft.template`. So
the served prompt tokens are the trained ones, and a prompt and seed give the text `afinar generate` gives. The
server shares `/predict`'s protections (`serving.http.base_app`: bearer token checked before the body is read, body size
and read-time limits, one-line JSON errors, a bounded queue with 503, a deadline, `/health`). Requests queue to one
worker thread, which generates them one after another: batched decoding of requests with different lengths and
sampling settings is not done. Not supported, and refused with a one-line 422 rather than ignored: `stream`,
`n > 1`, `stop`, logprobs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.inference.generation import (
    GREEDY_BELOW,
    MAX_NEW_TOKENS,
    MAX_SEED,
    SEED,
    TEMPERATURE,
    TOP_P,
    Generated,
    Generator,
)
from afinar.serving.http import ErrorResponse, MicroBatcher, base_app
from afinar.tasks import registry


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(BaseModel):
    """The sampling fields both endpoints share. What the schema calls invalid the server refuses (JSON's `true`
    or `"5"` is not a number, nor `0` the boolean false, though pydantic's lax mode would take them; `5.0` is an
    integer to JSON Schema, so lax mode stays for the rest); the features
    this server lacks (streaming, several choices, stop sequences) are in the schema as their one supported
    value, and asking for more gets a one-line 422 naming it."""

    model_config = ConfigDict(extra="ignore")  # clients send fields such as `user`: ignored

    model: str = Field(description="Any name: the server serves one model.")
    max_tokens: int | None = Field(default=None, ge=1, le=4096,
                                   description=f"New tokens at most (default {MAX_NEW_TOKENS}); cut to the positions "
                                               f"the model has left after the prompt (finish_reason length).")
    temperature: float = Field(default=TEMPERATURE, ge=0, le=2, description=f"0 (or below {GREEDY_BELOW:g}) "
                                                                             f"decodes greedily (deterministic).")
    top_p: float = Field(default=TOP_P, gt=0, le=1)
    seed: int | None = Field(default=SEED, ge=0, le=MAX_SEED, description="Seeds sampling; same seed, same answer (as "
                                                                          "afinar generate); null: unseeded.")
    stream: Literal[False] = Field(default=False, description="Streaming is not supported.")
    n: Literal[1] = Field(default=1, description="One choice per request.")
    stop: Annotated[list[str], Field(max_length=0)] | Literal[""] | None = Field(
        default=None, description="Stop sequences are not supported: leave it out, null or empty.")

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("stream") is True:
                raise ValueError("stream=true is not supported by this server; send stream=false")
            if "stream" in data and not isinstance(data["stream"], bool):
                raise ValueError("stream must be false")
            numbers = [key for key in ("max_tokens", "seed", "n", "temperature", "top_p")
                       if isinstance(data.get(key), (bool, str))]
            if numbers:
                raise ValueError(f"{numbers[0]} must be a number, not {data[numbers[0]]!r}")
            if data.get("n", 1) != 1:
                raise ValueError("n must be 1 on this server")
            if data.get("stop"):
                raise ValueError("stop sequences are not supported by this server")
        return data


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1, description="Text to continue (a causal_lm run) or to answer (an sft run).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]


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


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


@dataclass
class GenerationWorker:
    """The generator as the batcher's scorer: `scores` (the batcher's name for its one call) generates each job."""

    generator: Generator
    labels: list[str] = field(default_factory=list)

    def scores(self, jobs: list[GenerationJob], batch_size: int = 1) -> list[Generated]:
        return [self.generator.generate(job.prompt_ids, job.max_tokens, job.temperature, job.top_p, job.seed)
                for job in jobs]


def create_generation_app(run_dir: str | Path, token: str | None, max_text_chars: int = 10_000,
                          max_body_bytes: int = 4 * 1024 * 1024, max_queue: int = 64, timeout_s: float = 120.0,
                          read_timeout_s: float = 10.0, default_max_tokens: int = MAX_NEW_TOKENS,
                          generator: Generator | None = None) -> FastAPI:
    """The OpenAI-compatible API for the finished causal_lm or sft run in `run_dir` (its model loaded now)."""
    run = Run.open(run_dir)
    run.require_finished()
    task = registry.for_run(run)
    if not task.generates:
        raise AfinarError(f"{run.path} is a {task.name} run, which does not generate; the OpenAI-compatible "
                          f"endpoints serve runs of tasks that do")
    generator = generator or Generator.for_run(run, task.chat_prompts)
    name = run.path.name
    batcher = MicroBatcher(GenerationWorker(generator), 1, 0.0, max_queue, stall_seconds=2 * timeout_s)
    app, guarded, errors = base_app(f"OpenAI-compatible generation with a fine-tuned {task.name} model", batcher, token,
                                    max_body_bytes, read_timeout_s)
    errors = {**errors, 413: {"model": ErrorResponse, "description": "Prompt too long"},
              503: {"model": ErrorResponse, "description": "Too many requests waiting, or generation took too long"}}

    def job(prompt_ids: list[int], request: _Sampling) -> GenerationJob:
        try:
            max_tokens = generator.room(prompt_ids, request.max_tokens or default_max_tokens)
        except AfinarError as exc:
            raise HTTPException(413, str(exc)) from None
        return GenerationJob(prompt_ids, max_tokens, request.temperature, request.top_p, request.seed)

    def text_limit(text: str, what: str) -> None:
        if len(text) > max_text_chars:
            raise HTTPException(413, f"{what} has {len(text):,} characters; the limit is max_text_chars="
                                     f"{max_text_chars:,}")

    async def run_job(work: GenerationJob) -> Generated:
        try:
            results = await asyncio.wait_for(batcher.scores([work]), timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"generation took longer than {timeout_s:g} s; retry later",
                                headers={"Retry-After": "1"}) from None
        return results[0]

    def usage(result: Generated) -> Usage:
        return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                     total_tokens=result.prompt_tokens + result.completion_tokens)

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded, responses=errors)
    async def models() -> ModelList:
        """The one model this server serves."""
        return ModelList(data=[ModelCard(id=name, created=int(run.path.stat().st_mtime))])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=guarded, responses=errors)
    async def chat_completions(request: ChatCompletionRequest) -> ChatCompletion:
        """An answer to the conversation, rendered through the run's saved chat template (with the trained system
        prompt when the conversation opens without one)."""
        messages = [m.model_dump() for m in request.messages]
        for i, message in enumerate(messages):
            text_limit(message["content"], f"message {i}")
        result = await run_job(job(generator.format.chat_ids(generator.tokenizer, messages), request))
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=name,
                              choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=result.text),
                                                  finish_reason=result.finish_reason)], usage=usage(result))

    @app.post("/v1/completions", response_model=Completion, dependencies=guarded, responses=errors)
    async def completions(request: CompletionRequest) -> Completion:
        """A causal_lm run continues the prompt; an sft run answers it as the user text it trained on (wrapped in
        its `sft.template`, after its system prompt, through its chat template)."""
        text_limit(request.prompt, "prompt")
        try:
            prompt_ids = generator.format.prompt_ids(generator.tokenizer, request.prompt)
        except AfinarError as exc:
            raise HTTPException(422, f"prompt: {exc}") from None
        result = await run_job(job(prompt_ids, request))
        return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=name,
                          choices=[CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason)],
                          usage=usage(result))

    return app


__all__ = ["create_generation_app"]
