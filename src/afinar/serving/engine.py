"""The generation server's decoding loop: one thread owns the model and a continuous batch
(`inference.decoding.DecodingBatch`); requests wait in a bounded queue and join the batch between steps.

Bounds, each with its own error: `max_waiting` requests may wait (more: `Busy`, 429), each for at most
`queue_timeout_s` (then `QueueTimeout`, 429: the server cannot start it in time); once decoding, a request has
`time_limit_s` of generation (the sequence's own deadline: it ends with reason "timeout" at the next token). A
request that is cancelled (its client went away) leaves the batch before the next token, waiting or decoding. The
event loop never runs the model: each sequence reports its text through callbacks, which `Events` turns into an
asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from afinar.inference.generation import Generator, Sequence

log = logging.getLogger(__name__)


class Busy(Exception):
    """The waiting queue is full."""


class QueueTimeout(Exception):
    """A request waited longer than the queue allows for a free row."""


class Stopped(Exception):
    """The decoding thread is not running (it died, or the server is stopping)."""


@dataclass
class DecodingLoop:
    """Decodes submitted sequences, up to `max_rows` at once, in a thread of its own (the app's `Worker`)."""

    generator: Generator
    max_rows: int = 16
    max_waiting: int = 64
    queue_timeout_s: float = 60.0
    stall_seconds: float = 60.0  # one step (or one batch of prompts) longer than this: /health says stalled
    _waiting: deque[tuple[Sequence, float]] = field(default_factory=deque, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _busy_since: float | None = field(default=None, init=False)
    _decoding: int = field(default=0, init=False)  # rows in the batch after the last step

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="afinar-decoding", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 60)
        self._thread = None

    def state(self) -> str:
        if self._thread is None or not self._thread.is_alive():
            return "stopped"
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.stall_seconds:
            return "stalled"
        return "ok"

    def submit(self, seq: Sequence) -> None:
        if self._thread is None:
            raise RuntimeError("the decoding loop is not running: serve the app with its lifespan (uvicorn does; "
                               "in tests use `with TestClient(app)`)")
        if not self._thread.is_alive():
            raise Stopped("the decoding thread has stopped (see the server log); restart the server")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise Busy(f"the server is busy: {self.max_waiting:,} requests are waiting; retry later")
            self._waiting.append((seq, time.monotonic()))
        self._wake.set()

    def load(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "decoding": self._decoding}

    def _take(self, room: int) -> list[Sequence]:
        """Up to `room` waiting sequences, oldest first; cancelled and expired ones end here, room or not."""
        now = time.monotonic()
        with self._lock:
            kept: deque[tuple[Sequence, float]] = deque()
            for seq, since in self._waiting:
                if not seq.cancelled and now - since <= self.queue_timeout_s:
                    kept.append((seq, since))
                    continue
                try:  # it leaves the queue whatever its callbacks do
                    if seq.cancelled:
                        seq.finish("cancelled")
                    else:
                        seq.fail(QueueTimeout(f"no decoding row came free within {self.queue_timeout_s:g} s; "
                                              f"retry later"))
                except Exception as exc:  # noqa: BLE001 - e.g. its event loop closed
                    log.error("ending a waiting request failed: %s: %s", type(exc).__name__, exc)
            taken = [kept.popleft()[0] for _ in range(min(room, len(kept)))]
            self._waiting = kept
        return taken

    def _run(self) -> None:
        batch = self.generator.batch(self.max_rows)
        while not self._stopping.is_set():
            joining = self._take(batch.room)
            if not joining and not batch.rows:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._busy_since = time.monotonic()
            try:
                if joining:
                    try:
                        batch.admit(joining)
                    except Exception as exc:
                        log.error("starting %d request(s) failed: %s: %s", len(joining), type(exc).__name__, exc)
                        if any(seq in batch.rows for seq in joining):  # failed half-joined: the batch is unsound
                            batch.fail_all(exc)
                        for seq in joining:  # failed before joining: the rows already decoding go on
                            seq.fail(exc)
                if batch.rows:
                    batch.step()
            except Exception as exc:
                log.error("decoding failed: %s: %s", type(exc).__name__, exc)
                try:
                    batch.fail_all(exc)
                except Exception as callback_error:  # noqa: BLE001 - the loop must survive any request's callback
                    log.error("failing the batch failed: %s", callback_error)
            finally:
                self._busy_since = None
                self._decoding = len(batch.rows)
        batch.fail_all(RuntimeError("the server is stopping"))
        with self._lock:
            for seq, _ in self._waiting:
                seq.fail(RuntimeError("the server is stopping"))
            self._waiting.clear()


class Events:
    """A sequence's text deltas as an asyncio queue on the loop that serves its request: `None` once it ends."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()

    def on_text(self, delta: str) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    def on_finish(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
