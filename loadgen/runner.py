"""Drive a workload against one endpoint: warm-up, then open-loop or closed-loop dispatch.

Open loop (``request_rate`` finite): conversation start times are a Poisson process precomputed
from the seed; the dispatcher sleeps to each one and starts the conversation's task, which records
how late it got going (``RequestRecord.lateness_s``). Closed loop (``request_rate`` infinite and
``concurrency`` set): ``concurrency`` conversations are in flight at any time. Both together: Poisson
arrivals with at most ``concurrency`` in flight (vLLM's ``--max-concurrency``); lateness is taken
before the wait for a slot, so it measures the client only.

A conversation is one task whose turns run in order: turn k+1 is sent ``think_time_s`` after turn k's
reply ended, with that reply in its history. First turns are rendered and serialized before timing
starts; later turns can only be rendered once the reply they contain is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import numpy as np

from loadgen.client import RequestRecord, stream_request
from loadgen.progress import Progress
from loadgen.prompts import RenderedRequest
from loadgen.workloads.base import Conversation, Turn, Workload

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 6 * 3600.0  # as SGLang's bench client: a stuck request shows as an error, not a hang
READ_BUFSIZE_BYTES = 10 * 1024**2


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf  # conversation starts per second (single-turn: requests per second)
    concurrency: int | None = None
    num_prompts: int | None = None  # cap on measured requests
    duration_s: float | None = None  # stop starting requests after this long
    warmup_requests: int = 1
    seed: int = 1

    @property
    def open_loop(self) -> bool:
        return math.isfinite(self.request_rate)


@dataclass
class RunResult:
    records: list[RequestRecord]  # warm-up first, then measured requests in send order
    rendered: dict[int, RenderedRequest]  # request_id -> what was sent, for the reuse analysis
    duration_s: float  # benchmark start (after warm-up) -> last measured request done


def poisson_arrivals(count: int, rate: float, seed: int) -> np.ndarray:
    """Start offsets in seconds: 0, then exponential gaps of mean 1/rate (all 0 when rate is inf)."""
    if count == 0:
        return np.zeros(0)
    if not math.isfinite(rate):
        return np.zeros(count)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def make_session(timeout_s: float = DEFAULT_TIMEOUT_S) -> aiohttp.ClientSession:
    """The one HTTP session a benchmark shares: no connection cap, a large read buffer."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        read_bufsize=READ_BUFSIZE_BYTES,
    )


def truncate_workload(workload: Workload, num_prompts: int | None) -> tuple[Conversation, ...]:
    """Whole conversations until ``num_prompts`` requests; the runner stops at the cap mid-conversation too."""
    if num_prompts is None:
        return workload.conversations
    kept, total = [], 0
    for conversation in workload.conversations:
        if total >= num_prompts:
            break
        kept.append(conversation)
        total += len(conversation.turns)
    return tuple(kept)


class _Run:
    """State of one run: ids, records, stop conditions. Lives for one ``run_load`` call."""

    def __init__(self, session, url, renderer, load: LoadConfig, progress: Progress | None = None) -> None:
        self.session = session
        self.progress = progress
        self.url = url
        self.renderer = renderer
        self.load = load
        self.records: list[RequestRecord] = []
        self.rendered: dict[int, RenderedRequest] = {}
        self.origin = time.perf_counter()
        self.issued = 0

    def now_s(self) -> float:
        return time.perf_counter() - self.origin

    def may_issue(self) -> bool:
        load = self.load
        if load.num_prompts is not None and self.issued >= load.num_prompts:
            return False
        return load.duration_s is None or self.now_s() < load.duration_s

    async def send(
        self,
        conversation: Conversation,
        index: int,
        rendered: RenderedRequest,
        *,
        warmup: bool,
        scheduled_s: float | None,
        dispatch_s: float,
    ) -> RequestRecord:
        record = RequestRecord(
            request_id=len(self.records),
            conversation_id=conversation.conversation_id,
            turn_index=index,
            group=conversation.group,
            session_id=conversation.session_id,
            warmup=warmup,
            scheduled_s=scheduled_s,
            dispatch_s=dispatch_s,
        )
        self.records.append(record)
        self.rendered[record.request_id] = rendered
        await stream_request(self.session, self.url, rendered.body, rendered.headers, record, self.origin)
        if self.progress is not None and not warmup:
            self.progress.update(record)
        return record

    async def conversation(
        self,
        conversation: Conversation,
        first: RenderedRequest,
        scheduled_s: float | None,
        slot: asyncio.Semaphore | contextlib.AbstractAsyncContextManager,
    ) -> None:
        dispatch_s = self.now_s()
        async with slot:
            history: list[tuple[Turn, str]] = []
            reply_end_s = 0.0
            for index, turn in enumerate(conversation.turns):
                if index > 0:
                    if turn.think_time_s > 0:
                        await asyncio.sleep(turn.think_time_s)
                    if scheduled_s is not None:  # open loop: due think time after the reply ended
                        scheduled_s = reply_end_s + turn.think_time_s
                    dispatch_s = self.now_s()
                if not self.may_issue():
                    return
                self.issued += 1
                rendered = first if index == 0 else self.renderer.render(conversation, history, turn)
                record = await self.send(
                    conversation,
                    index,
                    rendered,
                    warmup=False,
                    scheduled_s=scheduled_s,
                    dispatch_s=dispatch_s,
                )
                reply_end_s = self.now_s()
                if not record.success:
                    return  # the next turn needs this reply
                history.append((turn, record.generated_text))


async def run_load(
    session: aiohttp.ClientSession,
    url: str,
    workload: Workload,
    renderer,
    load: LoadConfig,
    warmup: Sequence[Conversation] = (),
    progress: Progress | None = None,
) -> RunResult:
    """Send ``warmup`` one by one (excluded from metrics), then ``workload`` under ``load``.

    ``renderer`` is a ``prompts.PromptRenderer`` (anything with its ``render`` method); ``progress``
    is told about every measured request as it finishes.
    """
    conversations = truncate_workload(workload, load.num_prompts)
    first_turns = [renderer.render(c, [], c.turns[0]) for c in conversations]
    offsets = poisson_arrivals(len(conversations), load.request_rate, load.seed)
    run = _Run(session, url, renderer, load, progress)
    for conversation in warmup:
        rendered = renderer.render(conversation, [], conversation.turns[0])
        await run.send(conversation, 0, rendered, warmup=True, scheduled_s=None, dispatch_s=run.now_s())

    if warmup and not any(r.success for r in run.records):
        log.warning("every warm-up request failed (first: %s); measuring anyway", run.records[0].error)
    run.origin = time.perf_counter()  # the benchmark clock starts after warm-up
    slot = asyncio.Semaphore(load.concurrency) if load.concurrency else contextlib.nullcontext()
    tasks = []
    for conversation, first, offset in zip(conversations, first_turns, offsets, strict=True):
        delay = offset - run.now_s()
        if delay > 0:
            await asyncio.sleep(delay)
        if load.duration_s is not None and run.now_s() >= load.duration_s:
            break
        scheduled = float(offset) if load.open_loop else None
        tasks.append(asyncio.create_task(run.conversation(conversation, first, scheduled, slot)))
    await asyncio.gather(*tasks)
    duration_s = run.now_s()
    warm = [r for r in run.records if r.warmup]
    measured = sorted((r for r in run.records if not r.warmup), key=lambda r: r.send_s)
    return RunResult(warm + measured, run.rendered, duration_s)
