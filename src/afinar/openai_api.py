"""OpenAI-compatible endpoints over a finished causal_lm or sft run: `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health`.

The official `openai` client works against it (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN)`).
Chat prompts are rendered through the chat template saved with the model, the one training used
(`chat.render_ids`), so the served prompt tokens are the trained ones. The server shares `/predict`'s
protections (`serve.base_app`: bearer token checked before the body is read, body size and read-time limits,
one-line JSON errors, a bounded queue with 503, a deadline, `/health`). Requests queue to one worker thread,
which generates them one after another: batched decoding of requests with different lengths and sampling
settings is not done. Not supported, and refused with a one-line 422 rather than ignored: `stream`, `n > 1`,
`stop`, logprobs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from afinar import chat
from afinar.errors import AfinarError
from afinar.runs import Run
from afinar.serve import ErrorResponse, MicroBatcher, base_app


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields such as `user` that change nothing here

    model: str = Field(description="Any name: the server serves one model.")
    max_tokens: int | None = Field(default=None, ge=1, le=4096, description="New tokens at most (default 128).")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0 decodes greedily (deterministic).")
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, description="Seeds sampling; same seed, same answer.")
    stream: bool = False
    n: int = 1
    stop: str | list[str] | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.stream:
            raise ValueError("stream=true is not supported by this server; send stream=false")
        if self.n != 1:
            raise ValueError("n must be 1 on this server")
        if self.stop:
            raise ValueError("stop sequences are not supported by this server")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str = Field(description="Text to continue (a causal_lm run) or to answer (an sft run).")


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
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Generator:
    """The run's model and tokenizer; `scores` (the batcher's name for its one call) generates each job."""

    labels: list[str] = []

    def __init__(self, model_dir: Path):
        from afinar.config import ModelArgs
        from afinar.models import load_causal_lm, load_tokenizer

        args = ModelArgs(name=str(model_dir))
        self.tokenizer = load_tokenizer(args, str(model_dir))
        self.model = load_causal_lm(args, str(model_dir), self.tokenizer).eval()
        self.limit = getattr(self.model.config, "max_position_embeddings", None) or \
            getattr(self.model.config, "n_positions", None)

    def scores(self, jobs: list[GenerationJob], batch_size: int = 1) -> list[Generated]:
        return [self._generate(job) for job in jobs]

    def _generate(self, job: GenerationJob) -> Generated:
        import torch
        from transformers import set_seed

        ids = torch.tensor([job.prompt_ids])
        sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p} if job.temperature > 0 \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if job.seed is not None:
            set_seed(job.seed)
        with torch.inference_mode():
            output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=job.max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                         **sampling)
        new = output[0, ids.shape[1]:].tolist()
        ended = self.tokenizer.eos_token_id in new
        if ended:
            new = new[:new.index(self.tokenizer.eos_token_id) + 1]
        return Generated(self.tokenizer.decode(new, skip_special_tokens=True), len(job.prompt_ids), len(new),
                         "stop" if ended else "length")


def create_generation_app(run_dir: str | Path, token: str | None, max_text_chars: int = 10_000,
                          max_body_bytes: int = 4 * 1024 * 1024, max_queue: int = 64, timeout_s: float = 120.0,
                          read_timeout_s: float = 10.0, default_max_tokens: int = 128,
                          generator: Generator | None = None) -> FastAPI:
    """The OpenAI-compatible API for the finished causal_lm or sft run in `run_dir` (its model loaded now)."""
    run = Run.open(run_dir)
    run.require_finished()
    task = run.config().task
    if task not in ("causal_lm", "sft"):
        raise AfinarError(f"{run.path} is a {task} run; the OpenAI-compatible endpoints serve causal_lm and sft runs")
    generator = generator or Generator(run.model_dir)
    tokenizer = generator.tokenizer
    name = run.path.name
    batcher = MicroBatcher(generator, 1, 0.0, max_queue, stall_seconds=2 * timeout_s)
    app, guarded, errors = base_app(f"OpenAI-compatible generation with a fine-tuned {task} model", batcher, token,
                                    max_body_bytes, read_timeout_s)
    errors = {**errors, 413: {"model": ErrorResponse, "description": "Prompt too long"},
              503: {"model": ErrorResponse, "description": "Too many requests waiting, or generation took too long"}}

    def job(prompt_ids: list[int], request: _Sampling) -> GenerationJob:
        max_tokens = request.max_tokens or default_max_tokens
        if generator.limit is not None and len(prompt_ids) + max_tokens > generator.limit:
            raise HTTPException(413, f"prompt ({len(prompt_ids)} tokens) plus max_tokens={max_tokens} exceed the "
                                     f"model's {generator.limit} positions")
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
        """An answer to the conversation, rendered through the run's saved chat template."""
        messages = [m.model_dump() for m in request.messages]
        for i, message in enumerate(messages):
            text_limit(message["content"], f"message {i}")
        result = await run_job(job(chat.render_ids(tokenizer, messages, generation_prompt=True), request))
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=name,
                              choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=result.text),
                                                  finish_reason=result.finish_reason)], usage=usage(result))

    @app.post("/v1/completions", response_model=Completion, dependencies=guarded, responses=errors)
    async def completions(request: CompletionRequest) -> Completion:
        """A causal_lm run continues the prompt; an sft run answers it as a user message (its chat template)."""
        text_limit(request.prompt, "prompt")
        prompt_ids = chat.render_ids(tokenizer, [{"role": "user", "content": request.prompt}], True) \
            if task == "sft" else tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise HTTPException(422, "prompt: empty; give the text to continue")
        result = await run_job(job(prompt_ids, request))
        return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=name,
                          choices=[CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason)],
                          usage=usage(result))

    return app


__all__ = ["Generator", "create_generation_app"]
