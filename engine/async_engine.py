"""Runs ``LLMEngine`` in a background thread and streams each request's tokens to asyncio callers.

The step loop owns the engine: requests and aborts reach it through a thread-safe inbox and are
applied between steps, so the scheduler and KV pool are only ever touched by one thread. Everyone
else reads ``info`` (immutable facts) and ``stats`` (an immutable snapshot the step loop replaces
after every change). Torch releases the GIL inside kernels, so the event loop stays responsive while
a step runs. This is the whole interface the HTTP server uses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from cache.api.kv_fields import KVPin
from cache.api.replies import KVFetch
from cache.api.sampling import SamplingParams
from cache.prompt.tokenizer import Tokenizer
from engine.engine import EngineInfo, EngineStats, LLMEngine
from engine.sampling import TokenLogprobs
from engine.sequence import FinishReason, Sequence

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class GenerationChunk:
    """What one choice of a request gained since its previous chunk. ``text`` never contains a stop
    string. With n > 1 the choices' chunks interleave; ``finished`` ends one choice."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int  # this choice's, so far
    index: int = 0  # the choice
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when the request asks for them
    kv_fetch: KVFetch | None = None  # the server's: the fetch plan the request ran before its prefill


class EngineError(RuntimeError):
    """The engine failed while running this request (reported to the caller, never swallowed)."""


class _Update(NamedTuple):
    """What the step thread tells a request about one of its choices."""

    choice: int
    tokens: list[int]
    logprobs: list[TokenLogprobs] | None
    finished: bool
    reason: str | None
    cached: int


class _ChoiceText:
    """One choice's text: incremental detokenization, with text that may begin a stop string held
    back until it is known not to, and cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self.decoder = tokenizer.incremental_decoder()
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # text that might begin a stop string
        self.pending = ""
        self.completion = 0
        self.finished = False

    def advance(self, update: _Update) -> tuple[str, bool, str | None, bool]:
        """(text to emit, finished, finish reason, whether a stop string ended it here)."""
        self.completion += len(update.tokens)
        self.pending += self.decoder.add_many(update.tokens)
        finished, reason, stopped = update.finished, update.reason, False
        if finished:
            self.pending += self.decoder.flush()
        if self.stops:
            cut = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
            if cut >= 0:
                self.pending, stopped = self.pending[:cut], not finished
                finished, reason = True, FinishReason.STOP.value
        text, self.pending = (self.pending, "") if finished else _split_hold(self.pending, self.hold)
        self.finished = finished
        return text, finished, reason, stopped


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.info: EngineInfo = engine.info
        self.stats: EngineStats = engine.stats()  # replaced (never mutated) by the step loop
        # ("add" | "abort", Sequence) or ("call", (function, future)): applied between steps
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue[_Update | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # -- requests ----------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        request_id: str | None = None,
        cache_salt: str = "",
        kv_pins: tuple[KVPin, ...] = (),
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a request's output, every choice's chunks as they come; breaking out of the
        iteration aborts the request. The prompt must respect ``info.limits`` (``cache.api.requests``
        checks it). Raises ValueError for a request id already running (before anything is queued)."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        if self._stopping or self._loop is None:
            raise EngineError("the engine is not running")
        seq = self.engine.make_sequence(request_id, prompt_ids, sampling, cache_salt, kv_pins)
        choices = [seq, *seq.forks]
        stream: asyncio.Queue[_Update | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        self._submit("add", seq)
        texts = [_ChoiceText(self.tokenizer, sampling.stop) for _ in choices]
        try:
            remaining = len(choices)
            while remaining:
                update = await stream.get()
                if isinstance(update, BaseException):
                    raise update
                out = texts[update.choice]
                if out.finished:  # a stop string ended it; the engine may have been a step ahead
                    continue
                text, finished, reason, stopped = out.advance(update)
                if stopped:
                    self._submit("abort", choices[update.choice])
                remaining -= finished
                yield GenerationChunk(
                    request_id,
                    update.tokens,
                    text,
                    finished,
                    reason,
                    len(prompt_ids),
                    update.cached,
                    out.completion,
                    update.choice,
                    update.logprobs,
                )
        finally:
            for choice, out in zip(choices, texts, strict=True):
                if not out.finished:
                    self._submit("abort", choice)  # the caller went away: free its pages
            self._streams.pop(request_id, None)

    async def call(self, function: Callable[[LLMEngine], T]) -> T:
        """Run ``function(engine)`` on the engine thread between two steps; the only safe way to touch
        the scheduler, pool or prefix cache from outside (e.g. flushing the cache)."""
        assert self._loop is not None, "the engine is not running"
        future: asyncio.Future[T] = self._loop.create_future()
        self._submit("call", (function, future))
        return await future

    async def flush_cache(self) -> bool:
        """Drop every cached prefix; False (nothing done) while requests are running."""
        return await self.call(lambda engine: engine.flush_cache())

    def _submit(self, kind: str, item: Any) -> None:
        self._inbox.put((kind, item))
        self._wakeup.set()

    # -- the step loop (engine thread) ---------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._apply_inbox()
            engine.pins.expire()  # also while idle, so that the pinned-pages figure stays true
            self.stats = engine.stats()
            if not engine.scheduler.has_work():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                updated = engine.step()  # isolates each request's failure (``LLMEngine.step``)
            except Exception as exc:  # a bug outside any one request: reported to every caller, go on
                log.exception("engine step failed; failing the running requests")
                self._fail_all(EngineError(f"engine step failed: {exc}"))
                continue
            self._publish([(s.request_id, self._outcome(s)) for s in updated])
        self._fail_all(EngineError("the engine is shutting down"))
        self.stats = engine.stats()

    def _apply_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                self._call(*item)
            elif kind == "add":
                self.engine.add(item)
            elif not item.finished:  # "abort"
                self.engine.abort(item)
                update = _Update(
                    item.choice, [], None, True, FinishReason.ABORT.value, item.num_cached_prompt
                )
                self._publish([(item.request_id, update)])

    def _call(self, function: Callable[[LLMEngine], Any], future: asyncio.Future) -> None:
        try:
            result, error = function(self.engine), None
        except Exception as exc:  # handed to the awaiting caller
            result, error = None, exc
        assert self._loop is not None

        def settle() -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self._loop.call_soon_threadsafe(settle)

    @classmethod
    def _outcome(cls, seq: Sequence) -> _Update | BaseException:
        """What a stepped sequence's caller gets: its new token, or its own failure."""
        if seq.finish_reason is FinishReason.ERROR:
            return EngineError(seq.error or "the engine failed while running this request")
        return cls._update(seq)

    @staticmethod
    def _update(seq: Sequence) -> _Update:
        reason = seq.finish_reason.value if seq.finish_reason else None
        logprobs = [seq.last_logprobs] if seq.last_logprobs is not None else None
        return _Update(
            seq.choice, [seq.output_ids[-1]], logprobs, seq.finished, reason, seq.num_cached_prompt
        )

    def _fail_all(self, error: EngineError) -> None:
        sched = self.engine.scheduler
        failed = list(sched.running) + list(sched.waiting)
        for seq in failed:
            self.engine.abort(seq)
        self._publish([(seq.request_id, error) for seq in failed])

    def _publish(self, items: list[tuple[str, _Update | BaseException]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[str, _Update | BaseException]]) -> None:
        for request_id, update in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(update)


def _split_hold(text: str, hold: int) -> tuple[str, str]:
    """Emit all but the last ``hold`` characters, which could be the start of a stop string."""
    if hold <= 0 or not text:
        return text, ""
    return text[:-hold], text[-hold:]
