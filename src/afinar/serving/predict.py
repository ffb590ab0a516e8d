"""The prediction API: `POST /predict` (labels and scores for texts or sentence pairs) and `GET /info`, over any
predictor a task loads for its runs (`Task.load_predictor`), on the shared HTTP base (`serving.http`)."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from afinar.core.runs import Run, reads_pairs
from afinar.serving.http import ErrorResponse, MicroBatcher, Scorer, base_app


def _texts_or_pairs(schema: dict) -> None:
    """The request's schema as the validators judge it: exactly one of texts and pairs, each a non-empty array
    (a field left out is absent, never null)."""
    for name in ("texts", "pairs"):
        field = schema["properties"][name]
        array = next(option for option in field.pop("anyOf") if option.get("type") == "array")
        field.pop("default", None)
        field.update({**array, "minItems": field.pop("minLength", array.get("minItems", 1))})
    schema["oneOf"] = [{"required": ["texts"]}, {"required": ["pairs"]}]


class _Inputs(BaseModel):
    """What every request shape shares: no unknown fields, no explicit nulls, no text the tokenizer would choke
    on."""

    model_config = ConfigDict(extra="forbid")
    refuses: ClassVar[tuple[str, str] | None] = None  # (the other shape's field, what to send instead)

    @model_validator(mode="before")
    @classmethod
    def _right_shape(cls, data: Any) -> Any:
        if cls.refuses and isinstance(data, dict) and cls.refuses[0] in data:
            raise ValueError(cls.refuses[1])
        return data

    @field_validator("texts", "pairs", mode="before", check_fields=False)
    @classmethod
    def _not_null(cls, items: Any) -> Any:
        """An explicit null is not a list: the schema does not allow it, so neither does the server."""
        if items is None:
            raise ValueError("must be a list; leave the field out instead of sending null")
        return items

    @field_validator("texts", "pairs", check_fields=False)
    @classmethod
    def _encodable(cls, items: list | None) -> list | None:
        """JSON can carry lone surrogates (`"\\ud800"`); the tokenizer would fail on them mid-batch and take the
        other requests sharing that batch down with it, so they are refused here, per request."""
        for i, item in enumerate(items or []):
            try:
                for text in item if isinstance(item, tuple) else (item,):
                    text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"text {i} is not valid Unicode (it holds a lone surrogate)") from None
        return items

    def inputs(self) -> list[str] | list[tuple[str, str]]:
        texts = getattr(self, "texts", None)
        return texts if texts is not None else [tuple(p) for p in self.pairs]


TEXTS = "Texts to classify; predictions come back in this order."
PAIRS = "Sentence pairs, for a model trained on pairs; predictions come back in this order."


class TextsRequest(_Inputs):
    """A run that reads one text per input: `texts` only, so the schema offers nothing the server refuses."""

    refuses = ("pairs", "this model reads one text per input: send {\"texts\": [...]}")
    texts: list[str] = Field(min_length=1, description=TEXTS)


class PairsRequest(_Inputs):
    """A run trained on sentence pairs: `pairs` only."""

    refuses = ("texts", "this model reads sentence pairs: send {\"pairs\": [[a, b], ...]}")
    pairs: list[tuple[str, str]] = Field(min_length=1, description=PAIRS)


class PredictRequest(_Inputs):
    """Either `texts` or `pairs`, never both, for a classifier served without a run (which could read either):
    the schema says so (`oneOf`), as the validators do."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_texts_or_pairs)

    texts: list[str] | None = Field(default=None, min_length=1, description=TEXTS)
    pairs: list[tuple[str, str]] | None = Field(default=None, min_length=1, description=PAIRS)

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.texts is None) == (self.pairs is None):
            raise ValueError("give either texts or pairs")
        return self


def request_model(pairs: bool | None) -> type[_Inputs]:
    """The request shape a run reads (`None`: no run, so either)."""
    return PredictRequest if pairs is None else PairsRequest if pairs else TextsRequest


class ScoredLabel(BaseModel):
    label: str = Field(description="The most probable label.")
    scores: dict[str, float] = Field(description="Probability of every label (single-label models: they sum to 1).")
    labels: list[str] | None = Field(default=None, description="Multi-label models: every label at or above its "
                                                               "threshold tuned on validation.")


class PredictResponse(BaseModel):
    predictions: list[ScoredLabel]


class Limits(BaseModel):
    max_batch: int = Field(description="Most texts scored in one forward pass, across requests.")
    max_texts: int = Field(description="Most texts in one request.")
    max_text_chars: int = Field(description="Most characters in one text.")
    max_body_bytes: int = Field(description="Largest request body.")
    batch_wait_ms: float = Field(description="How long the first request of a batch waits for company.")
    max_queue: int = Field(description="Most requests waiting to be scored; more get 503.")
    score_timeout_s: float = Field(description="Longest a request waits for its scores; then 503.")
    read_timeout_s: float = Field(description="Longest a client may take to send its headers or its body.")


class InfoResponse(BaseModel):
    run: str | None = Field(description="The run folder's name.")
    model: str | None = Field(description="The base model the run fine-tuned.")
    labels: list[str]
    backend: str | None = Field(default=None, description="What computes predictions: torch, torch-bf16, onnx or "
                                                           "onnx-int8.")
    metrics: dict[str, Any] = Field(description="The run's validation and test metrics, as in metrics.json.")
    limits: Limits



class SpanOut(BaseModel):
    text: str = Field(description="The span's text: the input's characters start..end.")
    type: str = Field(description="The entity type, or `answer`.")
    start: int = Field(description="Character offset of the span's first character in the input (the context, for "
                                   "question answering).")
    end: int = Field(description="Character offset just after the span's last character.")
    score: float = Field(description="The model's probability for the span.")


class SpansOut(BaseModel):
    text: str = Field(description="The input text (the question, for question answering).")
    spans: list[SpanOut] = Field(description="Entities in input order, or the answer (none when no span fits).")


class SpansResponse(BaseModel):
    predictions: list[SpansOut]


def _info(run: Run | None, labels: list[str], backend: str | None, limits: Limits) -> InfoResponse:
    metrics = {split: {key: value for key, value in scores.items() if key != "rows"}  # per-row results stay home
               for split, scores in (run.metrics() if run else {}).items() if split in ("validation", "test")}
    return InfoResponse(run=run.path.name if run else None, model=run.config().model.name if run else None,
                        labels=labels, metrics=metrics, backend=backend, limits=limits)


async def _scored(batcher: MicroBatcher, inputs: list, max_texts: int, max_text_chars: int, timeout_s: float):
    """`inputs` scored in the shared batches, after the per-request limits (413) and within the timeout (503)."""
    if len(inputs) > max_texts:
        raise HTTPException(413, f"{len(inputs):,} texts in one request; the limit is max_texts={max_texts:,}")
    for i, item in enumerate(inputs):
        size = sum(map(len, item)) if isinstance(item, tuple) else len(item)
        if size > max_text_chars:
            raise HTTPException(413, f"text {i} has {size:,} characters; the limit is "
                                     f"max_text_chars={max_text_chars:,}")
    try:
        return await asyncio.wait_for(batcher.scores(inputs), timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(503, f"scoring took longer than score_timeout_s={timeout_s:g}; retry later",
                            headers={"Retry-After": "1"}) from None


PREDICT_ERRORS = {413: {"model": ErrorResponse, "description": "Too many texts, a text or the body too long"},
                  408: {"model": ErrorResponse, "description": "The body did not arrive in time"},
                  503: {"model": ErrorResponse, "description": "Too many requests waiting, or scoring took too long"}}


def create_predict_app(run: Run | None, classifier: Scorer, token: str | None, max_batch: int, max_texts: int,
                       max_text_chars: int, batch_wait_ms: float, max_body_bytes: int, max_queue: int,
                       score_timeout_s: float, read_timeout_s: float) -> FastAPI:
    """`POST /predict` and `GET /info` over `classifier` (a finished run's predictor, or a test's wrapper when
    `run` is None: /info then reports no run and either texts or pairs are accepted). A predictor of spans
    (`spans = True`: entities, answers) answers with spans and offsets instead of labels and scores."""
    spans = getattr(classifier, "spans", False)
    labels = list(classifier.labels)
    pairs = reads_pairs(run) if run else None  # None: a classifier given without a run, either kind accepted
    info = _info(run, labels, getattr(classifier, "backend", None),
                 Limits(max_batch=max_batch, max_texts=max_texts, max_text_chars=max_text_chars,
                        max_body_bytes=max_body_bytes, batch_wait_ms=batch_wait_ms, max_queue=max_queue,
                        score_timeout_s=score_timeout_s, read_timeout_s=read_timeout_s))
    batcher = MicroBatcher(classifier, max_batch, batch_wait_ms / 1000, max_queue, stall_seconds=2 * score_timeout_s)
    app, guarded, errors = base_app("Entities and answers from a fine-tuned model" if spans else
                                    "Text classification with a fine-tuned model", batcher, token, max_body_bytes,
                                    read_timeout_s)

    @app.get("/info", response_model=InfoResponse, dependencies=guarded, responses=errors)
    async def get_info() -> InfoResponse:
        """The run, its labels, its validation and test metrics, and the request limits."""
        return info

    async def predict(request: PredictRequest) -> PredictResponse:
        """The most probable label and every label's probability for each text (or sentence pair), in input
        order."""
        rows = await _scored(batcher, request.inputs(), max_texts, max_text_chars, score_timeout_s)
        thresholds = getattr(classifier, "thresholds", None)  # a multi-label model
        return PredictResponse(predictions=[
            ScoredLabel(label=labels[int(row.argmax())], scores=dict(zip(labels, row.tolist())),
                        labels=None if thresholds is None else
                        [name for name, p, t in zip(labels, row, thresholds) if p >= t]) for row in rows])

    async def predict_spans(request: PredictRequest) -> SpansResponse:
        """The entities of each text (or the answer to each question in its context, sent as a pair), with
        character offsets into the text (the context), in input order."""
        found = await _scored(batcher, request.inputs(), max_texts, max_text_chars, score_timeout_s)
        return SpansResponse(predictions=[SpansOut(text=p.text, spans=[SpanOut(**s.to_dict()) for s in p.spans])
                                          for p in found])

    endpoint, response = (predict_spans, SpansResponse) if spans else (predict, PredictResponse)
    endpoint.__annotations__["request"] = request_model(pairs)  # the run's own shape, in the schema and validation
    app.post("/predict", response_model=response, dependencies=guarded,
             responses={**errors, **PREDICT_ERRORS})(endpoint)
    return app
