"""The worker pool: what each upstream can do, whether it is healthy, and how loaded it is.

Load is the gateway's own in-flight count (exact: incremented at dispatch, decremented in a
``finally`` whatever happens to the request) combined with what the worker reports (``/get_load``),
which also sees traffic from other gateway replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import aiohttp
import orjson

from cache.index.rekey import gateway_block_size
from cache.planning.fetch_cost import FetchCost
from cache.planning.load_profile import LoadProfile
from cache.wire.hashing import HASH_SCHEME
from gateway.event_sources import EventSource, from_sglang_config, on_worker_host
from gateway.proxy import read_capped

log = logging.getLogger(__name__)

UNREACHABLE = "unreachable"

# Probes never follow redirects: a worker's 3xx is not an answer, and following one would make the gateway
# fetch (or POST to) a URL no admin attached.
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)
_FLUSH_TIMEOUT = aiohttp.ClientTimeout(total=10)
_MAX_PROBE_BYTES = 2**20  # a probe answer larger than this is not one


@dataclass
class Worker:
    url: str
    worker_id: str
    # "prefixgate" (our engine) | "sglang" (native API) | "openai" (plain upstream) | UNREACHABLE (it has
    # not answered a probe yet: what it is, is not known)
    kind: str = UNREACHABLE
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
    # Names the worker's process (our engine's ``instance_id``): a new one at the same URL is a restart,
    # whose cache is gone. None: the worker does not say (then a restart shows in its KV events' seq).
    instance_id: str | None = None
    device_capacity_tokens: int | None = None  # KV tokens its tiers hold, as it reports them
    host_capacity_tokens: int | None = None
    # KV transfer (``--kv-transfer``): its KV layout as ``GET /kv_transfer/info`` shows it, None without;
    # two workers exchange pages only when theirs are equal (``gateway.fetch_plans``).
    kv_layout: tuple[tuple[str, str | int], ...] | None = None
    kv_fetch_cost: FetchCost | None = None  # what its fetches from peers measured (same answer, every check)
    healthy: bool = False
    in_flight: int = 0
    reported_load: int = 0  # running + waiting as the worker last reported it
    external_load: int = 0  # of that, requests not sent by this gateway (other replicas, direct clients)
    consecutive_failures: int = 0
    circuit_open_until: float = 0.0
    routed: int = 0
    events_ingested: bool = False  # the gateway consumes this worker's KV events (set by GatewayState)
    # Prefill/decode disaggregation: "prefill" workers prefill for "decode" ones; "mixed" do both. Set
    # by ``--prefill``/``--decode``, else read from the worker (SGLang's ``disaggregation_mode``).
    role: str = "mixed"
    role_configured: bool = False
    bootstrap_port: int | None = None  # an SGLang prefill worker's KV bootstrap server
    load_profile: LoadProfile | None = None  # its measured speed (our engine's /load_profile), for P:D advice

    @property
    def load(self) -> int:
        # Our in-flight count is exact and current; the worker's report is up to one health interval
        # old, so only its excess over what we had in flight at that moment is added.
        return self.in_flight + self.external_load

    @property
    def available(self) -> bool:
        return self.healthy and time.monotonic() >= self.circuit_open_until

    @property
    def kv_bytes_per_token(self) -> int | None:
        """KV bytes one token's pages hold (K and V of every layer), from its ``kv_layout``; None without."""
        layout = dict(self.kv_layout or ())
        names = ("layers", "kv_heads", "head_dim", "element_bytes")
        dims = [d for name in names if isinstance(d := layout.get(name), int) and d > 0]
        return 2 * math.prod(dims) if len(dims) == len(names) else None

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
            "role": self.role,
            "model": self.model_id,
            "healthy": self.healthy,
            "available": self.available,
            "in_flight": self.in_flight,
            "reported_load": self.reported_load,
            "load": self.load,
            "routed": self.routed,
            "kv_events": self.kv_events_endpoint,
            "kv_transfer": self.kv_layout is not None,
            "kv_fetch_cost": self.kv_fetch_cost.to_json() if self.kv_fetch_cost is not None else None,
            "context_length": self.context_length,
            "instance_id": self.instance_id,
            # in index blocks (``page_size`` tokens), as the index counts what it holds
            "device_capacity_blocks": _blocks(self.device_capacity_tokens, self.page_size),
            "host_capacity_blocks": _blocks(self.host_capacity_tokens, self.page_size),
            "consecutive_failures": self.consecutive_failures,
        }


class WorkerPool:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        failure_threshold: int,
        circuit_open_s: float,
        configured_events: dict[str, EventSource] | None = None,
        on_restart: Callable[[Worker], Awaitable[None]] | None = None,
    ) -> None:
        """``configured_events``: worker URL -> its KV event source, as given on the command line
        (``--worker-events``); it wins over what the worker's server info reveals. ``on_restart``: awaited
        when a health check finds a new process at a worker's URL, before it is healthy again (the
        gateway purges what its index holds for the old one)."""
        self.session = session
        self.on_restart = on_restart
        self.configured_events = configured_events or {}
        self.failure_threshold = failure_threshold
        self.circuit_open_s = circuit_open_s
        self.workers: dict[str, Worker] = {}

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self.workers.values()))

    def available(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.available]

    async def add(self, url: str, role: str | None = None) -> Worker:
        """``role``: the worker's part in disaggregation as configured (None: as the worker says)."""
        url = url.rstrip("/")
        worker = self.workers.get(url) or Worker(url=url, worker_id=url)
        if role is not None:
            worker.role, worker.role_configured = role, True
        problem = await self.probe(worker)
        if problem is not None:
            log.warning(
                "worker %s does not answer (%s); it gets no requests until a health check passes",
                worker.url,
                problem,
            )
        self.workers[worker.worker_id] = worker
        return worker

    def remove(self, worker_id: str) -> Worker | None:
        return self.workers.pop(worker_id, None)

    # -- capability detection and health -----------------------------------------------------------
    async def probe(self, worker: Worker) -> str | None:
        """Detect what the worker speaks; marks it healthy if it answers at all. Returns why it is not
        (None when it answered)."""
        info, info_problem = await self._request("GET", worker, "/get_server_info", _PROBE_TIMEOUT, json=True)
        if not isinstance(info, dict):
            info = None
        if info is not None:
            worker.instance_id = _instance_id(info.get("instance_id"))
            worker.device_capacity_tokens, worker.host_capacity_tokens = _capacity_tokens(info)
            scheme = info.get("kv_block_hash")
            worker.hash_scheme = scheme if isinstance(scheme, str) else None
            worker.kind = "prefixgate" if str(scheme).startswith("prefixgate/") else "sglang"
            worker.engine_page_size = _positive_int(info.get("page_size")) or worker.engine_page_size
            worker.context_length = _positive_int(info.get("context_length"))
            worker.kv_events = _events_from_info(info, worker.url)
            worker.dp_ranks = _dp_ranks(info)
            mode = info.get("disaggregation_mode")
            if not worker.role_configured and mode in ("prefill", "decode", "null"):
                worker.role = "mixed" if mode == "null" else mode
            worker.bootstrap_port = _positive_int(info.get("disaggregation_bootstrap_port"))
            served = info.get("served_model_name")
            worker.model_id = served if isinstance(served, str) and served else worker.model_id
        worker.kv_events = self.configured_events.get(worker.url, worker.kv_events)
        if worker.kv_events is not None and worker.kv_events.dp_ranks:  # ``--worker-events ...,dp=N``
            worker.dp_ranks = worker.kv_events.dp_ranks
        worker.page_size = (
            worker.engine_page_size if worker.own_hashes else gateway_block_size(worker.engine_page_size)
        )
        if worker.kind == "prefixgate":
            await self._read_transfer_info(worker)
        else:
            worker.kv_layout = worker.kv_fetch_cost = None
        models, models_problem = await self._request("GET", worker, "/v1/models", _PROBE_TIMEOUT, json=True)
        data = models.get("data") if isinstance(models, dict) else None
        if (
            isinstance(data, list)
            and data
            and isinstance(data[0], dict)
            and isinstance(data[0].get("id"), str)
        ):
            worker.model_id = worker.model_id or data[0]["id"]
        worker.healthy = info is not None or models is not None
        if not worker.healthy:
            return models_problem or info_problem
        if info is None and worker.kind == UNREACHABLE:
            worker.kind = "openai"
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
        return None

    async def check(self, worker: Worker) -> None:
        """Health and load. Logs only changes of state (down, with the reason; up again), never every
        probe. A worker that comes back, or reports a new ``instance_id`` in its load, is probed again,
        and a new instance is a restart: ``on_restart`` runs before it takes requests again."""
        instance, was_healthy = None, worker.healthy
        if worker.native:
            _, problem = await self._request("GET", worker, "/health", _PROBE_TIMEOUT)
            load = await self._get_json(worker, "/get_load") if problem is None else None
            if isinstance(load, list) and load:  # SGLang answers one entry per data-parallel rank
                load = load[0]
            if isinstance(load, dict):
                instance = _instance_id(load.get("instance_id"))
                running, waiting = load.get("num_reqs"), load.get("num_waiting_reqs")
                worker.reported_load = (_positive_int(running) or 0) + (_positive_int(waiting) or 0)
                worker.external_load = max(0, worker.reported_load - worker.in_flight)
            if problem is None and worker.kind == "prefixgate":
                worker.load_profile = LoadProfile.from_json(await self._get_json(worker, "/load_profile"))
                if worker.kv_layout is not None:  # its fetches' measurements move
                    await self._read_transfer_info(worker, refresh=True)
        else:
            _, problem = await self._request("GET", worker, "/v1/models", _PROBE_TIMEOUT)
        ok = problem is None
        new_instance = instance is not None and instance != worker.instance_id
        if ok and (new_instance or not was_healthy):
            before = worker.instance_id
            await self.probe(worker)  # back, or a new process: what it serves may have changed too
            if before is not None and worker.instance_id not in (None, before):
                log.warning(
                    "worker %s restarted (instance %s -> %s): its cache is gone",
                    worker.url,
                    before,
                    worker.instance_id,
                )
                if self.on_restart is not None:
                    await self.on_restart(worker)
        if ok and not was_healthy:
            log.info("worker %s passes its health check: it takes requests", worker.url)
            worker.consecutive_failures = 0
            worker.circuit_open_until = 0.0
        elif not ok and was_healthy:
            log.warning(
                "worker %s failed its health check (%s); no requests go to it until one passes",
                worker.url,
                problem,
            )
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
    async def _read_transfer_info(self, worker: Worker, refresh: bool = False) -> None:
        """Our engine's ``GET /kv_transfer/info``: its KV layout (None: transfer off, a 404) and what
        its fetches measured (``cache.planning.fetch_cost``; None when not well-formed). ``refresh``: a
        health check's re-read, where an answer that did not come keeps what is known (a layout only
        changes with a restart, which the probe reads)."""
        info = await self._get_json(worker, "/kv_transfer/info")
        if refresh and not isinstance(info, dict):
            return
        worker.kv_layout = _kv_layout(info)
        cost = info.get("fetch_cost") if isinstance(info, dict) and worker.kv_layout is not None else None
        worker.kv_fetch_cost = FetchCost.from_json(cost)

    async def _get_json(self, worker: Worker, path: str) -> dict | list | None:
        answer, _ = await self._request("GET", worker, path, _PROBE_TIMEOUT, json=True)
        return answer if isinstance(answer, dict | list) else None

    async def _ok(self, method: str, worker: Worker, path: str, timeout: aiohttp.ClientTimeout) -> bool:
        """Whether ``worker`` answers ``method path`` with 200 (never following a redirect)."""
        return (await self._request(method, worker, path, timeout))[1] is None

    async def _request(
        self, method: str, worker: Worker, path: str, timeout: aiohttp.ClientTimeout, json: bool = False
    ) -> tuple[object, str | None]:
        """``(its JSON answer if json, None)`` when ``worker`` answers ``method path`` with 200 (and JSON
        of at most ``_MAX_PROBE_BYTES``); else ``(None, why not)``, worded for a log line."""
        try:
            async with self.session.request(
                method, worker.url + path, timeout=timeout, allow_redirects=False
            ) as r:
                if r.status != 200:
                    return None, f"{path} answered HTTP {r.status}"
                if not json:
                    return None, None
                raw = await read_capped(r.content, _MAX_PROBE_BYTES + 1)
                if len(raw) > _MAX_PROBE_BYTES:
                    return None, f"{path} answered more than {_MAX_PROBE_BYTES} bytes"
                return orjson.loads(raw), None
        except aiohttp.ClientConnectorError as exc:
            error = exc.os_error
            return None, f"cannot connect: {os.strerror(error.errno) if error.errno else error}"
        except asyncio.TimeoutError:
            return None, f"{path} did not answer in time"
        except aiohttp.ClientError as exc:
            return None, f"{path}: {type(exc).__name__}: {exc}"
        except ValueError:
            return None, f"{path} answered something that is not JSON"


def _positive_int(value: object) -> int | None:
    """A worker-reported count, or None when it is not a positive integer (workers are not trusted)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _instance_id(value: object) -> str | None:
    """A worker's process id as it reports it, or None when it does not (or sends something unreasonable:
    workers are not trusted, and the id goes to logs and /stats)."""
    return value if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable() else None


def _blocks(tokens: int | None, page_size: int) -> int | None:
    return tokens // page_size if tokens is not None else None


def _capacity_tokens(info: dict) -> tuple[int | None, int | None]:
    """KV tokens the worker's device and host tiers hold: our engine's ``max_total_tokens`` and
    ``max_total_host_tokens``; SGLang's ``max_total_num_tokens``, and with HiCache sized by ratio,
    ``hicache_ratio`` times that. None: not reported (0 host tokens: no host tier)."""
    device = _positive_int(info.get("max_total_tokens")) or _positive_int(info.get("max_total_num_tokens"))
    host = info.get("max_total_host_tokens")
    if isinstance(host, int) and not isinstance(host, bool) and host >= 0:
        return device, host
    if info.get("enable_hierarchical_cache") is False:
        return device, 0
    ratio, size = info.get("hicache_ratio"), info.get("hicache_size")
    if device and isinstance(ratio, int | float) and not isinstance(ratio, bool) and ratio > 0 and not size:
        return device, int(device * ratio)
    return device, None


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


def _kv_layout(info: object) -> tuple[tuple[str, str | int], ...] | None:
    """The ``layout`` of our engine's ``GET /kv_transfer/info`` (model, dtype, shape) as a comparable
    value, or None (KV transfer off: a 404; or an answer that is not a small flat object)."""
    layout = info.get("layout") if isinstance(info, dict) else None
    if not isinstance(layout, dict) or not 0 < len(layout) <= 16:
        return None
    if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in layout.values()):
        return None
    return tuple(sorted((str(k), v) for k, v in layout.items()))


MAX_DP_RANKS = 256


def _dp_ranks(info: dict) -> int:
    """SGLang publishes one stream per attention-DP rank (``attn_dp_rank``), i.e. ``dp_size`` of them with
    ``enable_dp_attention``; without it every scheduler publishes as rank 0."""
    if info.get("enable_dp_attention") is False:
        return 1
    return min(_positive_int(info.get("dp_size")) or 1, MAX_DP_RANKS)
