"""The worker pool: what each upstream can do, whether it is healthy, and how loaded it is.

Load is the gateway's own in-flight count (exact: incremented at dispatch, decremented in a
``finally`` whatever happens to the request) combined with what the worker reports (``/get_load``),
which also sees traffic from other gateway replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import orjson

from cache.index.rekey import gateway_block_size
from cache.wire.hashing import HASH_SCHEME
from gateway.event_sources import EventSource, from_sglang_config, on_worker_host
from gateway.proxy import read_capped

log = logging.getLogger(__name__)

# Probes never follow redirects: a worker's 3xx is not an answer, and following one would make the gateway
# fetch (or POST to) a URL no admin attached.
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)
_FLUSH_TIMEOUT = aiohttp.ClientTimeout(total=10)
_MAX_PROBE_BYTES = 2**20  # a probe answer larger than this is not one


@dataclass
class Worker:
    url: str
    worker_id: str
    kind: str = "openai"  # "prefixgate" (our engine) | "sglang" (native API) | "openai" (plain upstream)
    model_id: str | None = None
    # Tokens per index block for this worker, as the router hashes its prompts: the engine's page for
    # an engine of our hash scheme (its events name those blocks); for any other engine
    # ``gateway_block_size(engine_page_size)``, so that a matched block is always whole engine pages.
    page_size: int = 16
    engine_page_size: int = 16  # as the worker reports it
    hash_scheme: str | None = None  # ``kv_block_hash`` from its server info; None: not reported
    context_length: int | None = None  # max tokens per sequence, as /get_server_info reports it
    kv_events: EventSource | None = None  # where it publishes KV events, if it does
    dp_ranks: int = 1  # KV event streams: one per data-parallel rank
    healthy: bool = False
    in_flight: int = 0
    reported_load: int = 0  # running + waiting as the worker last reported it
    external_load: int = 0  # of that, requests not sent by this gateway (other replicas, direct clients)
    consecutive_failures: int = 0
    circuit_open_until: float = 0.0
    routed: int = 0
    events_ingested: bool = False  # the gateway consumes this worker's KV events (set by GatewayState)

    @property
    def load(self) -> int:
        # Our in-flight count is exact and current; the worker's report is up to one health interval
        # old, so only its excess over what we had in flight at that moment is added.
        return self.in_flight + self.external_load

    @property
    def available(self) -> bool:
        return self.healthy and time.monotonic() >= self.circuit_open_until

    @property
    def kv_events_endpoint(self) -> str | None:
        return self.kv_events.endpoint if self.kv_events is not None else None

    @property
    def own_hashes(self) -> bool:
        """Its KV events name blocks with the gateway's hashes; otherwise they are renamed
        (``cache.index.rekey``) and its prompts hashed in ``page_size``-token blocks to match."""
        return self.hash_scheme == HASH_SCHEME

    @property
    def native(self) -> bool:
        return self.kind in ("prefixgate", "sglang")

    @property
    def precise(self) -> bool:
        """Its KV events keep the index exact; otherwise the gateway inserts approximate entries."""
        return self.events_ingested

    def describe(self) -> dict:
        return {
            "id": self.worker_id,
            "url": self.url,
            "kind": self.kind,
            "model": self.model_id,
            "healthy": self.healthy,
            "available": self.available,
            "in_flight": self.in_flight,
            "reported_load": self.reported_load,
            "load": self.load,
            "routed": self.routed,
            "kv_events": self.kv_events_endpoint,
            "context_length": self.context_length,
            "consecutive_failures": self.consecutive_failures,
        }


class WorkerPool:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        failure_threshold: int,
        circuit_open_s: float,
        configured_events: dict[str, EventSource] | None = None,
    ) -> None:
        """``configured_events``: worker URL -> its KV event source, as given on the command line
        (``--worker-events``); it wins over what the worker's server info reveals."""
        self.session = session
        self.configured_events = configured_events or {}
        self.failure_threshold = failure_threshold
        self.circuit_open_s = circuit_open_s
        self.workers: dict[str, Worker] = {}

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self.workers.values()))

    def available(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.available]

    async def add(self, url: str) -> Worker:
        url = url.rstrip("/")
        worker = self.workers.get(url) or Worker(url=url, worker_id=url)
        await self.probe(worker)
        self.workers[worker.worker_id] = worker
        return worker

    def remove(self, worker_id: str) -> Worker | None:
        return self.workers.pop(worker_id, None)

    # -- capability detection and health -----------------------------------------------------------
    async def probe(self, worker: Worker) -> None:
        """Detect what the worker speaks; marks it healthy if it answers at all."""
        info = await self._get_json(worker, "/get_server_info")
        if not isinstance(info, dict):
            info = None
        if info is not None:
            scheme = info.get("kv_block_hash")
            worker.hash_scheme = scheme if isinstance(scheme, str) else None
            worker.kind = "prefixgate" if str(scheme).startswith("prefixgate/") else "sglang"
            worker.engine_page_size = _positive_int(info.get("page_size")) or worker.engine_page_size
            worker.context_length = _positive_int(info.get("context_length"))
            worker.kv_events = _events_from_info(info, worker.url)
            worker.dp_ranks = _dp_ranks(info)
            served = info.get("served_model_name")
            worker.model_id = served if isinstance(served, str) and served else worker.model_id
        worker.kv_events = self.configured_events.get(worker.url, worker.kv_events)
        worker.page_size = (
            worker.engine_page_size if worker.own_hashes else gateway_block_size(worker.engine_page_size)
        )
        models = await self._get_json(worker, "/v1/models")
        data = models.get("data") if isinstance(models, dict) else None
        if (
            isinstance(data, list)
            and data
            and isinstance(data[0], dict)
            and isinstance(data[0].get("id"), str)
        ):
            worker.model_id = worker.model_id or data[0]["id"]
        worker.healthy = info is not None or models is not None
        log.info(
            "worker %s: kind=%s model=%s events=%s%s (%s hashes, %d-token blocks)",
            worker.url,
            worker.kind,
            worker.model_id,
            worker.kv_events_endpoint,
            f" x{worker.dp_ranks} DP ranks" if worker.dp_ranks > 1 else "",
            "own" if worker.own_hashes else "renamed",
            worker.page_size,
        )

    async def check(self, worker: Worker) -> None:
        if worker.native:
            ok = await self._ok("GET", worker, "/health", _PROBE_TIMEOUT)
            load = await self._get_json(worker, "/get_load") if ok else None
            if isinstance(load, list) and load:  # SGLang answers one entry per data-parallel rank
                load = load[0]
            if isinstance(load, dict):
                running, waiting = load.get("num_reqs"), load.get("num_waiting_reqs")
                worker.reported_load = (_positive_int(running) or 0) + (_positive_int(waiting) or 0)
                worker.external_load = max(0, worker.reported_load - worker.in_flight)
        else:
            ok = await self._ok("GET", worker, "/v1/models", _PROBE_TIMEOUT)
        if ok and not worker.healthy:
            log.info("worker %s is healthy again", worker.url)
            worker.consecutive_failures = 0
            worker.circuit_open_until = 0.0
        elif not ok and worker.healthy:
            log.warning("worker %s failed its health check", worker.url)
        worker.healthy = ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self), return_exceptions=True)

    # -- request outcomes (circuit breaker) ----------------------------------------------------------
    def record_success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0

    def record_failure(self, worker: Worker) -> None:
        worker.consecutive_failures += 1
        if worker.consecutive_failures >= self.failure_threshold:
            worker.circuit_open_until = time.monotonic() + self.circuit_open_s
            log.warning(
                "worker %s: %d failures in a row, circuit open for %.0f s",
                worker.url,
                worker.consecutive_failures,
                self.circuit_open_s,
            )

    @contextlib.contextmanager
    def dispatch(self, worker: Worker) -> Iterator[None]:
        """Count a request in flight on ``worker`` for exactly as long as the block runs."""
        worker.in_flight += 1
        worker.routed += 1
        try:
            yield
        finally:
            worker.in_flight -= 1

    # -- fan-out -------------------------------------------------------------------------------------
    async def flush_caches(self) -> dict[str, bool]:
        """SGLang's ``POST /flush_cache`` on every native worker at once: worker id -> whether it flushed
        (a busy worker refuses, as SGLang's does; an unreachable one counts as not flushed)."""
        native = [w for w in self if w.native]
        results = await asyncio.gather(*(self._ok("POST", w, "/flush_cache", _FLUSH_TIMEOUT) for w in native))
        return {w.worker_id: ok for w, ok in zip(native, results, strict=True)}

    # -- helpers -------------------------------------------------------------------------------------
    async def _get_json(self, worker: Worker, path: str) -> dict | list | None:
        try:
            async with self.session.get(
                worker.url + path, timeout=_PROBE_TIMEOUT, allow_redirects=False
            ) as r:
                if r.status != 200:
                    return None
                raw = await read_capped(r.content, _MAX_PROBE_BYTES + 1)
                return None if len(raw) > _MAX_PROBE_BYTES else orjson.loads(raw)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async def _ok(self, method: str, worker: Worker, path: str, timeout: aiohttp.ClientTimeout) -> bool:
        """Whether ``worker`` answers ``method path`` with 200 (never following a redirect)."""
        try:
            async with self.session.request(
                method, worker.url + path, timeout=timeout, allow_redirects=False
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False


def _positive_int(value: object) -> int | None:
    """A worker-reported count, or None when it is not a positive integer (workers are not trusted)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _events_from_info(info: dict, worker_url: str) -> EventSource | None:
    """Our engine's ``kv_events_endpoint`` (it binds), or SGLang's ``kv_events_config``."""
    endpoint = info.get("kv_events_endpoint")
    if isinstance(endpoint, str) and endpoint:
        key = info.get("kv_events_curve_public_key")
        return EventSource(
            on_worker_host(endpoint, worker_url),
            curve_server_key=key if isinstance(key, str) and key else None,
        )
    return from_sglang_config(info.get("kv_events_config"), worker_url)


MAX_DP_RANKS = 256


def _dp_ranks(info: dict) -> int:
    """SGLang publishes one stream per attention-DP rank (``attn_dp_rank``), i.e. ``dp_size`` of them with
    ``enable_dp_attention``; without it every scheduler publishes as rank 0."""
    if info.get("enable_dp_attention") is False:
        return 1
    return min(_positive_int(info.get("dp_size")) or 1, MAX_DP_RANKS)
