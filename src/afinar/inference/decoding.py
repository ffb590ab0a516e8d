"""Continuous batching: many generation requests decode together, each with its own sampling settings and seed.

A `DecodingBatch` holds the requests being decoded. Each `step` runs the model once for all of them, one new token
per request; requests join between steps (their prompts are run together, left-padded, and their keys and values
put beside the others') and leave the moment they finish, so a short request never waits for a long one to end and
a long one never waits for a batch to fill. Sequences differ in length: the batch keeps one key/value buffer per
layer, rows aligned on the right (the newest token in the last column), with an attention mask over the padding on
the left and each row's own position ids, so every row computes what it would alone.

Why not `model.generate`: it decodes a fixed batch to the end and samples every row with one global random state,
so one request cannot join, leave, stop on its own text, be cancelled, or keep its seed beside others. transformers'
own continuous batching (`generate_batch`) seeds the whole batch at once and targets CUDA paged attention. Keys and
values live in buffers that grow by doubling (`GrowingLayer`): `DynamicCache` concatenates each step, copying the
whole cache every token, which at 16 rows x 4,096 positions is gigabytes per token.

Each request is a `Sequence`: text is detokenized incrementally (a delta is released once it decodes to whole
characters) and held back while it could still be the start of a stop string, so the streamed deltas, the final
text and the text a client gets without streaming are one and the same string. Sampling is per row: temperature,
top-p and a `torch.Generator` seeded from the request's seed. A row's logits can differ in the last bits with the
batch it shares (another batch size changes the kernels' blocking); the exponential race (`Sequence.choose`) makes
a seeded sample depend on them only at exact near-ties (two tokens' races, or a token at the top_p cut), so a
request samples the text it samples alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from afinar.core.errors import AfinarError

GREEDY_BELOW = 1e-4  # a temperature this small decodes greedily: dividing logits by it overflows to inf
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Sampling:
    """How one request samples and where it stops."""

    max_new_tokens: int
    temperature: float = 0.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0
    seed: int | None = 0  # None: unseeded
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one, which is not returned
    ignore_eos: bool = False  # decode max_new_tokens whatever the stop token says (load tests)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise AfinarError(f"need max_new_tokens > 0, temperature >= 0 and 0 < top_p <= 1 (got "
                              f"{self.max_new_tokens}, {self.temperature}, {self.top_p})")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise AfinarError(f"seed must be between 0 and {MAX_SEED} (got {self.seed})")
        if any(not stop for stop in self.stop):
            raise AfinarError("a stop string is empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(eq=False)
class Sequence:
    """One request's decoding state and outcome. `on_text(delta)` is called (from the decoding thread) for each
    piece of text as it becomes final; `on_finish()` once, after the last."""

    prompt_ids: list[int]
    sampling: Sampling
    time_limit_s: float | None = None  # counted from the moment the sequence starts decoding
    on_text: Callable[[str], None] | None = None
    on_finish: Callable[[], None] | None = None
    ids: list[int] = field(default_factory=list)  # new tokens, the stop token included
    text: str = ""  # released text: the concatenation of every delta
    finish_reason: str | None = None  # stop (a stop token or string), length, cancelled, timeout
    error: BaseException | None = None
    cancelled: bool = False  # set from any thread; the sequence ends before its next token
    deadline: float | None = None
    _text_ids: list[int] = field(default_factory=list)  # the new tokens that make text (no special tokens)
    _pending: str = ""  # decoded but held back: it may begin a stop string
    _prefix_offset: int = 0
    _read_offset: int = 0
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def start(self, device: torch.device) -> None:
        if self.time_limit_s is not None:
            self.deadline = time.monotonic() + self.time_limit_s
        if not self.sampling.greedy:
            self._generator = torch.Generator(device=device)
            if self.sampling.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.sampling.seed)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (float32, one row). Sampling is the exponential race (Gumbel-max):
        the token whose probability over an Exp(1) draw of its own is largest, an exact sample of the softmax.
        Unlike inverting the cumulative sum over the vocabulary (`torch.multinomial`), where a draw lands within
        rounding of a boundary among tens of thousands, a draw here changes only if two tokens' races tie to the
        last bits, or a token sits exactly at the top_p cut, so the few-ulp differences a row's logits get from
        its batch company leave the sample alone."""
        if self.sampling.greedy:
            return int(logits.argmax())
        scores = torch.log_softmax(logits / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1:
            sorted_probs, order = scores.exp().sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.sampling.top_p
            outside[0] = False  # the likeliest token always stays (a top_p below float32's range rounds to 0)
            scores[order[outside]] = -torch.inf
        race = torch.empty_like(scores).exponential_(generator=self._generator)
        return int((scores - race.log()).argmax())

    def expired(self) -> str | None:
        if self.cancelled:
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "timeout"
        return None

    def add(self, token: int, tokenizer, stop_ids: set[int], special_ids: set[int]) -> None:
        """Take one new token; finish on a stop token, a stop string or the token budget."""
        self.ids.append(token)
        if token in stop_ids and not self.sampling.ignore_eos:
            self.finish("stop", tokenizer)
            return
        if token not in special_ids:
            self._text_ids.append(token)
            self._decode(tokenizer, final=False)
        if not self.done and len(self.ids) >= self.sampling.max_new_tokens:
            self.finish("length", tokenizer)

    def finish(self, reason: str, tokenizer=None) -> None:
        """End the sequence: what is decoded but unreleased (an incomplete character, a tail that did not become
        a stop string) is released first; a stop string completed by that flush makes the reason "stop"."""
        if self.done:
            return
        if tokenizer is not None:
            self._decode(tokenizer, final=True)
            if self.done:
                return
        self._release(self._pending)
        self._pending = ""
        self._end(reason)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.finish("cancelled")

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        if self.on_finish is not None:
            self.on_finish()

    def _decode(self, tokenizer, final: bool) -> None:
        """Incremental detokenization (as text-generation-inference does): decode from a few tokens back, so
        tokens that merge with their neighbours decode right, and release only whole characters; text that
        could still begin a stop string is held back."""
        ids = self._text_ids
        prefix = tokenizer.decode(ids[self._prefix_offset:self._read_offset], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)
        full = tokenizer.decode(ids[self._prefix_offset:], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            self._pending += full[len(prefix):]
        stops = self.sampling.stop
        found = [i for i in (self._pending.find(stop) for stop in stops) if i >= 0]
        if found:
            self._release(self._pending[:min(found)])
            self._pending = ""
            self._end("stop")
            return
        hold = max((n for stop in stops for n in range(min(len(stop) - 1, len(self._pending)), 0, -1)
                    if self._pending.endswith(stop[:n])), default=0)
        self._release(self._pending[:len(self._pending) - hold])
        self._pending = self._pending[len(self._pending) - hold:]

    def _release(self, delta: str) -> None:
        if delta:
            self.text += delta
            if self.on_text is not None:
                self.on_text(delta)


class GrowingLayer(DynamicLayer):
    """A layer's keys and values in buffers that double when full: a step writes one column instead of copying the
    whole cache, as `DynamicLayer`'s concatenation does. `keys`/`values` are views of the filled part."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        """Buffers holding `keys` and `values` with as much room again (a batch that changes rebuilds its layers;
        they must not reallocate at the next token)."""
        super().__init__()
        self.length = keys.shape[-2]
        capacity = max(64, 2 * self.length)
        self.buffers = tuple(torch.cat([t, t.new_zeros(*t.shape[:-2], capacity - self.length, t.shape[-1])], dim=-2)
                             for t in (keys, values))
        self.keys, self.values = (buffer[..., :self.length, :] for buffer in self.buffers)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.length + new > self.buffers[0].shape[-2]:
            capacity = max(2 * (self.length + new), 64)
            self.buffers = tuple(torch.cat([buffer[..., :self.length, :], buffer.new_zeros(
                *buffer.shape[:-2], capacity - self.length, buffer.shape[-1])], dim=-2) for buffer in self.buffers)
        self.buffers[0][..., self.length:self.length + new, :] = key_states
        self.buffers[1][..., self.length:self.length + new, :] = value_states
        self.length += new
        self.keys, self.values = (buffer[..., :self.length, :] for buffer in self.buffers)
        return self.keys, self.values


class GrowingCache(DynamicCache):
    def __init__(self, layers: list[GrowingLayer]):
        Cache.__init__(self, layers=layers)


@dataclass
class DecodingBatch:
    """The sequences decoding together on one model. Not thread-safe: one thread calls `admit` and `step`."""

    model: object
    tokenizer: object
    stop_ids: set[int]
    max_rows: int = 16
    rows: list[Sequence] = field(default_factory=list)
    mask: torch.Tensor | None = None  # (rows, columns): 1 where a column holds a row's token
    cache: GrowingCache | None = None
    positions: list[int] = field(default_factory=list)  # each row's next position id
    last: list[int] = field(default_factory=list)  # each row's newest token, the next step's input
    special_ids: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.stop_ids = set(self.stop_ids)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def room(self) -> int:
        return self.max_rows - len(self.rows)

    def admit(self, sequences: list[Sequence]) -> None:
        """Run the prompts of `sequences` (at most `room`) together and add them to the batch with their first
        token chosen; a sequence that finishes at once (a stop token first) never joins."""
        if not sequences:
            return
        if len(sequences) > self.room:
            raise ValueError(f"{len(sequences)} sequences for {self.room} free rows")
        width = max(len(seq.prompt_ids) for seq in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in sequences],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with torch.inference_mode():
            output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True, logits_to_keep=1)
        logits = output.logits[:, -1].float()
        if not cache.layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in cache.layers):
            raise AfinarError(f"{type(self.model).__name__} keeps other than plain key/value caches per layer "
                              f"(linear attention, state spaces, shared keys): afinar's batched decoding does not "
                              f"support it")
        self._join(sequences, mask, [(layer.keys, layer.values) for layer in cache.layers])
        for i, seq in enumerate(sequences):
            seq.start(self.device)
            seq.add(seq.choose(logits[i]), self.tokenizer, self.stop_ids, self.special_ids)
        self.last += [seq.ids[-1] for seq in sequences]
        self.positions += [len(seq.prompt_ids) for seq in sequences]
        self._drop_finished()

    def step(self) -> None:
        """One new token for every row; rows that finish (or were cancelled, or ran out of time) leave."""
        for seq in self.rows:
            reason = seq.expired()
            if reason:
                seq.finish(reason, self.tokenizer)
        self._drop_finished()
        if not self.rows:
            return
        assert self.mask is not None and self.cache is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([[token] for token in self.last], device=self.device),
                                attention_mask=self.mask, cache=self.cache, use_cache=True,
                                position_ids=torch.tensor([[p] for p in self.positions], device=self.device))
        logits = output.logits[:, -1].float()
        for i, seq in enumerate(self.rows):
            seq.add(seq.choose(logits[i]), self.tokenizer, self.stop_ids, self.special_ids)
            self.last[i] = seq.ids[-1]
            self.positions[i] += 1
        self._drop_finished()

    def fail_all(self, error: BaseException) -> None:
        for seq in self.rows:
            seq.fail(error)
        self.rows, self.last, self.positions, self.mask, self.cache = [], [], [], None, None

    def _join(self, sequences: list[Sequence], mask: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> None:
        """Put the newcomers' keys and values beside the batch's, right-aligned: the shorter side gets masked
        zero columns on the left."""
        self.rows += sequences
        if self.cache is None or self.mask is None:
            self.mask = mask
            self.cache = GrowingCache([GrowingLayer(k.clone(), v.clone()) for k, v in layers])
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)

        def left_pad(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
            if columns == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = columns
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        self.mask = torch.cat([left_pad(self.mask, width - old, 1), left_pad(mask, width - new, 1)], dim=0)
        self.cache = GrowingCache([
            GrowingLayer(torch.cat([left_pad(layer.keys, width - old, -2), left_pad(k, width - new, -2)]),
                         torch.cat([left_pad(layer.values, width - old, -2), left_pad(v, width - new, -2)]))
            for layer, (k, v) in zip(self.cache.layers, layers)])

    def _drop_finished(self) -> None:
        keep = [i for i, seq in enumerate(self.rows) if not seq.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.last = [self.last[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]
        if not keep:
            self.mask = self.cache = None
            return
        assert self.mask is not None and self.cache is not None
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        # columns that are padding in every remaining row (the longest rows left) are dropped
        first = int(mask.any(0).int().argmax())
        self.mask = mask[:, first:]
        self.cache = GrowingCache([GrowingLayer(layer.keys[index, :, first:], layer.values[index, :, first:])
                                   for layer in self.cache.layers])


def decode(batch: DecodingBatch, sequences: list[Sequence]) -> list[Sequence]:
    """Decode `sequences` to the end in this thread, as many at a time as `batch` has rows (`afinar generate`,
    in-run generation checks)."""
    waiting = list(sequences)
    while waiting or batch.rows:
        if waiting and batch.room:
            joining, waiting = waiting[:batch.room], waiting[batch.room:]
            batch.admit(joining)
        else:
            batch.step()
    return sequences
