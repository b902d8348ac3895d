"""The reader side of a transfer: carry out a request's fetch plan before its prefill is scheduled.

``fetch`` never raises and never fails the request: whatever goes wrong (an expired plan, a plan for
another namespace or another prompt, the source gone or no longer holding the blocks, a layout
mismatch, a timeout, a bad checksum, no room here) ends as an outcome with a ``failure`` reason, and
the request recomputes what was not fetched. Blocks that did arrive are in the tree, announced
through KV events, and the scheduler's prefix match takes them like any cached block.

Order of work: check the plan against the prompt (the plan's hashes must be this prompt's chained
hashes in this request's namespace), count what this engine already holds, reserve import memory
(a full buffer falls back at once: backpressure), ask the source to stage the rest, read it with the
transport, release the source's lease, verify every page's checksum, import on the engine thread.
The work runs as its own task: a request cancelled mid-fetch stops waiting at once, and the task
stops at its next step and frees what it holds on both sides (the import region only once no copy
can still touch it; the source's lease by release, or by expiry if the source cannot be reached).

Every fetch whose pages arrived is measured (``cache.planning.fetch_cost``: the bytes' throughput and
the per-fetch fixed cost); ``GET /kv_transfer/info`` shows the figures, and the gateway attaches a plan
only when they say moving the pages beats recomputing them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import xxhash

from cache.api.kv_fields import FetchPlan
from cache.planning.fetch_cost import FetchCost, FetchCostMeter
from engine.async_engine import AsyncEngine
from engine.kv.prefix_cache import BlockHasher
from engine.transfer import pages
from engine.transfer.buffer import TransferBuffer
from engine.transfer.protocol import ExportReply, ExportRequest, KVLayout, ProtocolError
from engine.transfer.transport import KVTransport, TransportError

log = logging.getLogger(__name__)

FAILURES = (
    "expired",  # the plan's expires_at_ms has passed
    "cross_namespace",  # the plan's namespace is not the request's cache_salt
    "plan_mismatch",  # the plan's hashes are not this prompt's blocks in this namespace
    "busy",  # this engine's import buffer is full
    "source_unreachable",  # the source's control channel did not answer
    "source_missing",  # the source no longer holds the blocks (evicted, flushed)
    "source_busy",  # the source's export buffer is full
    "layout_mismatch",  # another model, dtype or KV shape
    "bad_reply",  # the source broke the protocol
    "timeout",  # the fetch ran past timeout_s
    "transfer_failed",  # the transport could not read the pages
    "checksum",  # a page arrived with the wrong checksum
    "no_room",  # this engine's pool had no room, or its held prefix was evicted meanwhile
    "cancelled",  # the request went away
)


class FetchFailed(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in FAILURES
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class FetchOutcome:
    plan_id: str
    planned_tokens: int  # prompt tokens the plan covers (that this engine did not already hold)
    fetched_tokens: int  # of those, tokens whose KV arrived and entered the tree
    seconds: float
    failure: str | None = None  # one of FAILURES; None: every planned block arrived


class Fetcher:
    def __init__(
        self,
        engine: AsyncEngine,
        transport: KVTransport,
        buffer: TransferBuffer,
        layout: KVLayout,
        timeout_s: float,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.engine, self.transport, self.buffer = engine, transport, buffer
        self.layout, self.timeout_s, self._session = layout, timeout_s, session
        cache = engine.engine.cache  # its hashers are pure functions, fixed at construction
        assert cache.hasher is not None, "KV transfer names blocks by hash"
        self._hasher: BlockHasher = cache.hasher
        self._namespace_hash = cache.namespace_hash
        self._background: set[asyncio.Task] = set()
        self._cost = FetchCostMeter()

    @property
    def cost(self) -> FetchCost:
        """What this engine's fetches measured of the links they used (``GET /kv_transfer/info``)."""
        return self._cost.snapshot()

    def fetchable_hashes(self, prompt_ids: Sequence[int], cache_salt: str) -> list[int]:
        """The chained hashes of the prompt's pages a reader would fetch (every full page but one that
        holds the prompt's last token), in ``cache_salt``'s namespace: what a plan for it names."""
        ps = self.layout.page_size
        tokens = list(prompt_ids[: (len(prompt_ids) - 1) // ps * ps])
        seed = self._namespace_hash(cache_salt) if cache_salt and self._namespace_hash else None
        return self._hasher(seed, tokens) if tokens else []

    async def fetch(self, plan: FetchPlan, prompt_ids: Sequence[int], cache_salt: str) -> FetchOutcome:
        start = time.perf_counter()
        job = _Job(plan, list(prompt_ids), cache_salt)
        task = asyncio.create_task(self._run(job))
        self._keep(task)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except TimeoutError:
            job.abandoned = True
            job.failure = job.failure or "timeout"
        except asyncio.CancelledError:
            job.abandoned = True  # the task notices at its next step and cleans up
            raise
        seconds = time.perf_counter() - start
        if job.failure is not None:
            log.warning("KV fetch %s fell back to recomputing: %s", plan.plan_id, job.detail or job.failure)
        if job.fetched_blocks and not job.abandoned:  # pages arrived: a measurement of the link
            self._cost.observe(job.moved_bytes, job.transfer_s, seconds)
        return FetchOutcome(
            plan.plan_id,
            job.planned_blocks * self.layout.page_size,
            job.fetched_blocks * self.layout.page_size,
            seconds,
            job.failure,
        )

    def _keep(self, task: asyncio.Task) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run(self, job: _Job) -> None:
        try:
            await self._pull(job)
        except FetchFailed as exc:
            job.failure, job.detail = job.failure or exc.reason, str(exc)
        except Exception as exc:  # a bug: still a fallback, never a failed request, but say so loudly
            log.exception("KV fetch %s failed unexpectedly", job.plan.plan_id)
            job.failure, job.detail = job.failure or "bad_reply", repr(exc)

    async def _pull(self, job: _Job) -> None:
        plan, ps = job.plan, self.layout.page_size
        if plan.expires_at_ms <= time.time() * 1000:
            raise FetchFailed("expired")
        if plan.namespace != job.cache_salt:
            raise FetchFailed("cross_namespace", "a plan's blocks are only fetched into their own namespace")
        # At least one prompt token is always computed, so never more than (len - 1) // ps pages.
        wanted = min(plan.planned_prefix_blocks, (len(job.prompt_ids) - 1) // ps)
        tokens = job.prompt_ids[: wanted * ps]
        if wanted == 0 or self.fetchable_hashes(job.prompt_ids, job.cache_salt)[:wanted] != list(
            plan.block_hashes[:wanted]
        ):
            raise FetchFailed("plan_mismatch", "the plan's block hashes are not this prompt's")
        held = await self.engine.call(lambda engine: pages.held_blocks(engine, tokens, job.cache_salt))
        if held >= wanted:
            return  # nothing to fetch: already cached here
        job.planned_blocks = wanted - held
        size = job.planned_blocks * self.layout.page_bytes
        region = self.buffer.reserve(size)
        if region is None:
            raise FetchFailed("busy", "the import buffer is full")
        users: list[asyncio.Future] = []  # what may still touch the region
        try:
            await self._pull_into(job, tokens, held, region, users)
        finally:
            self.buffer.free_when_done(region, users)

    async def _pull_into(
        self, job: _Job, tokens: list[int], held: int, region: tuple[int, int], users: list[asyncio.Future]
    ) -> None:
        plan = job.plan
        reply = await self._export(job, held)
        try:
            job.check()
            length = reply.num_blocks * self.layout.page_bytes
            local = self.buffer.address + region[0]
            moving = time.perf_counter()
            read = asyncio.ensure_future(
                asyncio.to_thread(self.transport.read, reply.segment, local, reply.address, length)
            )
            users.append(read)
            try:
                await read
            except TransportError as exc:
                raise FetchFailed("transfer_failed", str(exc)) from None
        finally:
            self._keep(asyncio.create_task(self._release(plan.source_endpoint, reply.lease_id)))
        job.check()
        staged = self.buffer.view(region, length)
        size = self.layout.page_bytes
        sums = await asyncio.to_thread(
            lambda: [
                xxhash.xxh3_64_intdigest(staged[i * size : (i + 1) * size].numpy())
                for i in range(reply.num_blocks)
            ]
        )
        if sums != reply.checksums:
            bad = next(i for i, (a, b) in enumerate(zip(sums, reply.checksums, strict=True)) if a != b)
            raise FetchFailed("checksum", f"page {held + bad} of plan {plan.plan_id} arrived corrupt")
        job.moved_bytes, job.transfer_s = length, time.perf_counter() - moving
        job.check()
        importing = asyncio.ensure_future(
            self.engine.call(lambda engine: pages.import_pages(engine, tokens, job.cache_salt, held, staged))
        )
        users.append(importing)
        imported = await importing
        if imported == 0:
            raise FetchFailed("no_room", "no room in the KV pool for the fetched pages")
        job.fetched_blocks = imported
        if reply.num_blocks < job.planned_blocks:
            raise FetchFailed(
                "source_missing", f"the source held {reply.num_blocks} of {job.planned_blocks} blocks"
            )

    async def _export(self, job: _Job, held: int) -> ExportReply:
        plan = job.plan
        request = ExportRequest(
            plan.plan_id,
            plan.namespace,
            list(plan.block_hashes[: held + job.planned_blocks]),
            held,
            self.layout,
        )
        try:
            async with self._session().post(
                f"{plan.source_endpoint}/kv_transfer/export", json=request.to_json()
            ) as response:
                body = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise FetchFailed("source_unreachable", f"{plan.source_endpoint}: {exc!r}") from None
        if status != 200:
            code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
            reason = {
                "blocks_missing": "source_missing",
                "busy": "source_busy",
                "layout_mismatch": "layout_mismatch",
            }
            raise FetchFailed(
                reason.get(code or "", "bad_reply"), f"{plan.source_endpoint} answered {status}: {body}"
            )
        try:
            reply = ExportReply.from_json(body)
        except ProtocolError as exc:
            raise FetchFailed("bad_reply", str(exc)) from None
        if reply.layout != self.layout:  # checked on both sides, before a byte is read
            self._keep(asyncio.create_task(self._release(plan.source_endpoint, reply.lease_id)))
            raise FetchFailed("layout_mismatch", f"source layout {reply.layout}, ours {self.layout}")
        if reply.first_block != held or reply.num_blocks > job.planned_blocks:
            self._keep(asyncio.create_task(self._release(plan.source_endpoint, reply.lease_id)))
            raise FetchFailed("bad_reply", "the source staged other blocks than asked")
        return reply

    async def _release(self, source_endpoint: str, lease_id: str) -> None:
        """Best effort: a source that cannot be told frees the lease at its expiry."""
        try:
            async with self._session().post(
                f"{source_endpoint}/kv_transfer/release", json={"lease_id": lease_id}
            ) as response:
                await response.read()
        except (aiohttp.ClientError, OSError) as exc:
            log.info("could not release KV export lease %s at %s: %r", lease_id, source_endpoint, exc)

    async def close(self) -> None:
        """Wait for background work (releases, abandoned fetches) to end."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


@dataclass
class _Job:
    plan: FetchPlan
    prompt_ids: list[int]
    cache_salt: str
    planned_blocks: int = 0
    fetched_blocks: int = 0
    moved_bytes: int = 0  # read and verified
    transfer_s: float = 0.0  # spent reading and verifying them
    failure: str | None = None
    detail: str = ""
    abandoned: bool = False  # the request stopped waiting (cancelled, timed out)

    def check(self) -> None:
        if self.abandoned:
            raise FetchFailed(self.failure or "cancelled", "the request stopped waiting")
