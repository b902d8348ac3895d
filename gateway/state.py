"""Everything a running gateway holds, opened and closed in one place (``GatewayState.run``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import zmq.auth
from aiohttp import web

from cache.api.requests import ServingLimits
from cache.index.ops import ClearedOp, IndexOp, WorkerGoneOp
from cache.index.radix_index import RadixIndexConfig, TierBlocks
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig
from cache.index.rekey import ForeignWorkerNames
from cache.index.store import IndexStore, LocalIndexStore
from cache.index.zmq_consumer import KVEventConsumer
from cache.planning.pd_advice import SLO
from cache.prompt.model_files import model_path
from cache.prompt.tokenizer import Tokenizer
from cache.wire.tiers import Tier
from gateway.config import GatewayConfig
from gateway.dashboard import Dashboard, drop_dashboard_counters
from gateway.discovery import DnsWorkers
from gateway.dispatch import Dispatcher
from gateway.event_sources import parse_worker_events
from gateway.metrics import GatewayMetrics
from gateway.pd_advisor import PDAdvisor
from gateway.prompt_bounds import bytes_per_token
from gateway.proxy import Proxy
from gateway.router import Router
from gateway.shared_state import LocalSharedState, RedisSharedState, SharedState
from gateway.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0  # how long shutdown waits for background tasks before going on without them


async def run_periodically(
    stop: asyncio.Event, interval: Callable[[], float], step: Callable[[], Awaitable[None]], what: str
) -> None:
    """Run ``step`` every ``interval()`` seconds until ``stop`` is set; a failed step is logged, not fatal.

    Stops on the flag, not only on cancellation: a cancel that lands inside a redis-py call can be
    swallowed (redis/redis-py#2028), and a loop relying on it would never end.
    """
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval())
        if stop.is_set():
            return
        try:
            await step()
        except Exception:
            log.exception("%s failed; the next one will try again", what)


class GatewayState:
    def __init__(self, config: GatewayConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self._preloaded_tokenizer = tokenizer
        self.started = time.time()
        self.replica_id = uuid.uuid4().hex[:12]  # names this replica in the shared dashboard counters
        self.metrics = GatewayMetrics(config.recent_requests)
        self.advisor = PDAdvisor(
            SLO(config.ttft_slo_ms / 1e3, config.itl_slo_ms / 1e3),
            config.routing.pd_min_remote_prefill_tokens,
            config.pd_advice_window_s,
        )
        index_config = RadixIndexConfig(approx_ttl_s=config.routing.approx_ttl_s)
        self.store: IndexStore
        self.shared: SharedState
        if config.redis_url:
            redis_config = RedisStoreConfig(url=config.redis_url, key_prefix=config.redis_key_prefix)
            redis_store = RedisIndexStore(redis_config, index_config, replica_id=self.replica_id)
            self.store, self.shared = redis_store, RedisSharedState(redis_store)
        else:
            self.store, self.shared = LocalIndexStore(index_config), LocalSharedState()
        self._configured_events = parse_worker_events(config.worker_events)
        self.dns_workers = DnsWorkers(
            config.worker_dns, self.add_worker, self.remove_worker, static=config.workers
        )
        self._event_tasks: dict[str, list[asyncio.Task]] = {}  # worker id -> one task per DP rank
        self._foreign_names: dict[str, ForeignWorkerNames] = {}  # worker id -> its renamer (not ours)
        self._curve_client_keys: tuple[bytes, bytes] | None = None
        if config.kv_events_curve_key:
            public, secret = zmq.auth.load_certificate(config.kv_events_curve_key)
            if secret is None:
                raise ValueError(
                    f"{config.kv_events_curve_key}: no secret key in it (use the .key_secret file)"
                )
            self._curve_client_keys = (public, secret)
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()  # set at shutdown; the background loops check it

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        cfg = self.config
        if self._preloaded_tokenizer is None:
            log.info("gateway starting: loading the tokenizer of %s", model_path(cfg.model).name)
        self.tokenizer = self._preloaded_tokenizer or await asyncio.to_thread(
            Tokenizer.from_checkpoint_path, model_path(cfg.model)
        )
        self.limits = ServingLimits(vocab_size=self.tokenizer.vocab_size)  # without a context bound
        self.bytes_per_token = bytes_per_token(self.tokenizer)
        # Tokenizing takes seconds for long prompts: never on the event loop. One thread per core.
        self.tokenize_pool = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 1, thread_name_prefix="tokenize"
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )
        self.pool = WorkerPool(
            self.session,
            cfg.failure_threshold,
            cfg.circuit_open_s,
            self._configured_events,
            on_restart=self._worker_restarted,
        )
        self.router = Router(cfg.routing, self.pool, self.store, self.shared, self.tokenizer, self.metrics)
        timeouts = aiohttp.ClientTimeout(
            total=None,
            sock_connect=cfg.connect_timeout_s,
            sock_read=max(cfg.first_byte_timeout_s, cfg.read_timeout_s),
        )
        proxy = Proxy(self.session, timeouts, cfg.max_upstream_body_bytes)
        self.dispatcher = Dispatcher(self.router, self.pool, proxy, self.metrics, cfg.max_retries)
        self.dashboard = Dashboard(
            self.metrics,
            self.shared,
            self.replica_id,
            shared=cfg.redis_url is not None,
            in_flight=lambda: sum(w.in_flight for w in self.pool),
        )
        await self.store.start()
        for url in cfg.workers:
            await self.add_worker(url)
        for role, urls in (("prefill", cfg.prefill_workers), ("decode", cfg.decode_workers)):
            for url in urls:
                await self.add_worker(url, role)
        if cfg.worker_dns:
            await self.dns_workers.sync()
            dns = run_periodically(
                self._stop, lambda: cfg.worker_dns_interval_s, self.dns_workers.sync, "worker DNS"
            )
            self._tasks.append(asyncio.create_task(dns, name="gateway-worker-dns"))
        health = run_periodically(
            self._stop, lambda: cfg.health_interval_s, self._health_check, "health check"
        )
        # Dashboard samples on the second, so replicas' samples line up.
        dashboard = self.dashboard
        sample = run_periodically(
            self._stop, dashboard.seconds_to_next_sample, dashboard.tick, "dashboard sample"
        )
        self._tasks += [
            asyncio.create_task(health, name="gateway-health"),
            asyncio.create_task(sample, name="gateway-dashboard"),
        ]
        try:
            yield
        finally:
            # Loops stop on the flag too: a cancel that lands inside a redis-py call can be swallowed.
            self._stop.set()
            tasks = [*self._tasks, *(t for ranks in self._event_tasks.values() for t in ranks)]
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
            for task in pending:
                log.warning(
                    "background task %s did not stop within %.0f s", task.get_name(), SHUTDOWN_GRACE_S
                )
            if self.dashboard.shared:
                await self.dashboard.push()  # the cluster totals keep this replica's last second
            await self.store.close()
            await self.session.close()
            self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # -- workers -------------------------------------------------------------------------------------
    def served_models(self) -> list[str]:
        return sorted({w.model_id for w in self.pool if w.model_id})

    def context_limit(self, kind: str) -> int | None:
        """The most tokens a prompt may have: the smallest context any worker that could take this kind
        of request reports, capped by ``max_context_tokens``; None when nothing is known."""
        workers = [w for w in self.pool.available() if kind != "generate" or w.native] or list(self.pool)
        known = [w.context_length for w in workers if w.context_length]
        if self.config.max_context_tokens:
            known.append(self.config.max_context_tokens)
        return min(known) if known else None

    async def add_worker(self, url: str, role: str | None = None) -> Worker:
        worker = await self.pool.add(url, role)
        await self.shared.register_worker(worker.worker_id, {"url": worker.url, "kind": worker.kind})
        self._ensure_event_feed(worker)
        return worker

    async def remove_worker(self, worker_id: str) -> bool:
        worker = self.pool.remove(worker_id)
        if worker is None:
            return False
        self._foreign_names.pop(worker_id, None)
        for task in self._event_tasks.pop(worker_id, []):
            task.cancel()
        await self.store.append(WorkerGoneOp(worker_id))  # every replica forgets its blocks
        await self.shared.unregister_worker(worker_id)
        return True

    def _ensure_event_feed(self, worker: Worker) -> None:
        """Subscribe to ``worker``'s KV events, one consumer per DP rank. A foreign engine's events are
        renamed into the gateway's hashes, in the worker's namespace: not before its model is known."""
        source = worker.kv_events
        if (
            not (self.config.ingest_kv_events and source is not None)
            or worker.worker_id in self._event_tasks
            or (not worker.own_hashes and worker.model_id is None)
        ):
            return
        assert source is not None
        names = None
        if not worker.own_hashes:
            names = ForeignWorkerNames(worker.worker_id, worker.model_id or "", worker.page_size)
            self._foreign_names[worker.worker_id] = names
        errors = self.metrics.kv_event_errors
        tasks = []
        for rank in range(worker.dp_ranks):
            consumer = KVEventConsumer(
                source.feed(worker.worker_id, rank, self._curve_client_keys),
                self._apply_ops,
                on_bad_message=lambda reason, w=worker.worker_id: errors.labels(w, reason).inc(),
                names=names,
            )
            tasks.append(asyncio.create_task(consumer.run(), name=f"kv-events-{worker.url}-dp{rank}"))
        self._event_tasks[worker.worker_id] = tasks
        worker.events_ingested = True

    async def _worker_restarted(self, worker: Worker) -> None:
        """A new process answers at ``worker``'s URL (``WorkerPool.check`` saw a new instance id, before
        marking it healthy): what the index holds for it describes a cache that is gone. Purged now,
        not when its first KV event arrives, so no request is routed on the strength of it. (Its event
        feed purges once more when the new process's seq restarts: that costs hits, never correctness.)"""
        await self.store.append(ClearedOp(worker.worker_id))  # every replica forgets its blocks
        names = self._foreign_names.get(worker.worker_id)
        if names is not None:
            names.reset()

    async def _apply_ops(self, ops: list[IndexOp]) -> None:
        await self.store.append_many(ops)

    async def _health_check(self) -> None:
        await self.pool.check_all()
        for worker in self.pool:
            if worker.healthy and worker.model_id is None:
                await self.pool.probe(worker)  # it was down when attached
            self._ensure_event_feed(worker)
        self.store.index.expire()
        self.refresh_gauges()

    # -- observability -------------------------------------------------------------------------------
    def refresh_gauges(self) -> None:
        m = self.metrics
        stats = self.store.index.stats()
        per_worker = stats.per_worker
        m.observe_index(stats)
        for w in self.pool:
            m.worker_load.labels(w.worker_id).set(w.load)
            m.worker_healthy.labels(w.worker_id).set(1 if w.available else 0)
            for tier, blocks in per_worker.get(w.worker_id, TierBlocks(0, 0, 0))._asdict().items():
                m.index_blocks.labels(w.worker_id, tier).set(blocks)
        m.store_degraded.set(0 if self.store.status == "healthy" else 1)
        m.observe_store_errors(self.store_errors())
        self.advisor.refresh(list(self.pool), m, time.time())

    def store_errors(self) -> dict[str, int]:
        """Shared-store content that failed validation, by kind (cumulative for this store)."""
        return {**self.store.errors, "bad_shared_values": self.shared.bad_values}

    async def stats(self, since: float | None = None) -> dict:
        """``since``: also return the per-second history samples newer than this (0 = all of it)."""
        per_worker, policy = self.store.index.stats().per_worker, self.router.policy
        workers = []
        for w in self.pool:
            held = per_worker.get(w.worker_id, TierBlocks(0, 0, 0))._asdict()
            # what routing counts a lower-tier hit on it worth (measured, else --host-tier-weight)
            weights = {"host": policy.tier_weight(w, Tier.HOST), "disk": policy.tier_weight(w, Tier.DISK)}
            workers.append(
                {**w.describe(), **{f"index_{t}_blocks": n for t, n in held.items()}, "hit_weights": weights}
            )
        shared_counters = drop_dashboard_counters(await self.shared.counters())
        out = {
            "policy": self.router.policy.name,
            "store": self.store.status,
            "store_error": getattr(self.store, "last_error", None),
            "store_errors": self.store_errors(),
            "index": {"blocks": len(self.store.index), "session_pins": self.shared.pin_count()},
            "totals": self.metrics.summary(),
            "shared_counters": shared_counters,
            "workers": workers,
            "recent": self.metrics.recent_requests(),
            "pd_advice": self.advisor.refresh(list(self.pool), self.metrics, time.time()),
            "replica": self.replica_id,
            "time": time.time(),
        }
        if self.dashboard.cluster is not None:
            out["cluster"] = self.dashboard.cluster
        if since is not None:
            out["series"] = self.dashboard.since(since)
        return out


STATE = web.AppKey("state", GatewayState)
