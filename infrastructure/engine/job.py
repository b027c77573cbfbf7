"""What a request hands the engine (rows to generate) and what it gets back (an async stream of events)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from infrastructure.errors import PersonaError
from infrastructure.steering.spec import Capture, SteeringSpec

_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks force output lengths
    n_logprobs: int = 0  # > 0: report the chosen token's logprob and this many top candidates per token
    prompt_logprobs: int | None = None  # not None: score every prompt token, with this many top candidates
    grammar: str | None = None  # an llguidance grammar (e.g. a JSON schema) the sampled tokens must follow


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's score: log_softmax of the logits the sampler drew from (after penalties,
    divided by the temperature when it is > 0), with the `n_logprobs` best (token id, logprob) pairs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RowRequest:
    """One sequence to generate. `prompt_steer_mask` (one bool per prompt token) narrows where
    steering applies in the prompt, e.g. to message contents only; None means every position."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    steering: SteeringSpec | None = None
    captures: tuple[Capture, ...] = ()
    prompt_steer_mask: tuple[bool, ...] | None = None


@dataclass
class RowToken:
    row: int
    token_id: int
    delta: str
    text: str  # cumulative
    logprobs: list[TokenLogprob] | None = None  # tokens since the previous RowToken (n_logprobs > 0)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a row's first RowToken, when it scored its prompt


@dataclass
class RowFinished:
    row: int
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    captures: dict[str, list[float]] = field(default_factory=dict)  # name -> projection per position
    logprobs: list[TokenLogprob] | None = None  # every generated token's (n_logprobs > 0)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (the first: None), when asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class JobFailed:
    error: PersonaError


Event = RowToken | RowFinished | JobFailed


class EventChannel:
    """A job's events waiting for their consumer, on the event loop; bounded whatever the consumer does.

    Each RowToken carries the row's cumulative text, so an unbounded queue behind a stalled client held
    O(tokens x text) memory. Here a row's token events that the consumer has not taken yet merge into one
    (the latest token and cumulative text, the deltas joined): the channel holds at most one token event
    per row plus the terminal events, and a slow reader simply receives bigger steps. The engine never
    blocks on a reader (the row keeps its batch slot and its time budget, REQUEST_TIMEOUT_S, still runs);
    the paged engine reads `unread_tokens` and stops decoding a job whose reader falls too far behind."""

    def __init__(self) -> None:
        self.unread_tokens = 0  # tokens put and not yet taken
        self.taken_tokens = 0  # tokens the reader took (GenerationJob.unread_tokens: back-pressure)
        self._items: deque[Event] = deque()
        self._waiting: dict[int, tuple[RowToken, list[str]]] = {}  # row -> its queued token event, deltas
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: Event) -> None:
        if isinstance(event, RowToken):
            self.unread_tokens += 1
            queued = self._waiting.get(event.row)
            if queued is not None:  # merge into the row's event still waiting
                token, deltas = queued
                token.token_id, token.text = event.token_id, event.text
                if event.logprobs:  # the merged event carries every merged token's logprobs
                    token.logprobs = [*(token.logprobs or []), *event.logprobs]
                deltas.append(event.delta)
                return
            self._waiting[event.row] = (event, [event.delta])
        self._items.append(event)
        self._ready.set()

    async def get(self) -> Event:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        event = self._items.popleft()
        if isinstance(event, RowToken):
            _, deltas = self._waiting.pop(event.row)
            self.unread_tokens -= len(deltas)
            self.taken_tokens += len(deltas)
            if len(deltas) > 1:
                event.delta = "".join(deltas)
        return event


class GenerationJob:
    """A request's rows plus the channel its events travel on, from the inference thread to the loop."""

    def __init__(self, rows: list[RowRequest], timeout_s: float | None = None) -> None:
        self.id = next(_ids)
        self.rows = rows
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.submitted_at = time.monotonic()
        self._cancelled = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: EventChannel | None = None
        self.sent_tokens = 0  # token events handed to the event loop (counted on the inference thread)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue = EventChannel()

    @property
    def unread_tokens(self) -> int:
        """Tokens handed to the event loop that this job's reader has not taken yet. Counted when the inference
        thread hands them over, not when the loop delivers them, so a busy event loop cannot hide tokens from
        the back-pressure check (which then let a paused row run a few steps past MAX_UNREAD_TOKENS)."""
        return self.sent_tokens - self._queue.taken_tokens if self._queue is not None else 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this job's rows at its next step (client gone, or gave up)."""
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        """Called on the inference thread; hands the event to the event loop without blocking."""
        if self._loop is not None and not self._loop.is_closed():
            self.sent_tokens += isinstance(event, RowToken)
            self._loop.call_soon_threadsafe(self._queue.put, event)

    def _deliver(self, event: Event) -> None:
        self._queue.put(event)

    async def events(self) -> AsyncIterator[Event]:
        """Yield events until every row finished or the job failed; cancel the job if abandoned."""
        pending = len(self.rows)
        try:
            while pending:
                event = await self._queue.get()
                yield event
                if isinstance(event, JobFailed):
                    return
                if isinstance(event, RowFinished):
                    pending -= 1
        finally:
            if pending:
                self.cancel()


def emit_all(events: list[tuple[GenerationJob, Event]]) -> None:
    """Hand a step's events to their event loops with one wake-up per loop (not one per event): with
    dozens of streaming rows, per-event wake-ups keep the loop and the inference thread fighting for the GIL."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationJob, Event]]] = {}
    for job, event in events:
        if job._loop is not None and not job._loop.is_closed():
            job.sent_tokens += isinstance(event, RowToken)
            by_loop.setdefault(job._loop, []).append((job, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver_all, items)
        except RuntimeError:  # the loop closed meanwhile: nobody is listening any more
            pass


def _deliver_all(items: list[tuple[GenerationJob, Event]]) -> None:
    for job, event in items:
        job._deliver(event)
