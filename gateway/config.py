"""Gateway configuration, built once from the command line and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tenant:
    name: str
    salt: str  # enters the block-hash namespace and the worker's cache key (vLLM's ``cache_salt``)


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "cache_aware"  # round_robin | least_load | power_of_two | session | cache_aware
    # A cached token on the host tier saves this fraction of a device-tier hit (it must be copied back).
    host_tier_weight: float = 0.5
    # cache_aware cost = uncached prompt tokens + load_cost_tokens x in-flight requests on the worker.
    load_cost_tokens: int = 128
    # Bounded-load guard: a worker stops taking requests (whatever it caches) once it would exceed both
    # bounded_load_factor x the mean load and the least loaded worker + bounded_load_slack. The slack
    # keeps small absolute imbalances, which cost little, from overriding cache affinity (SGLang's
    # router likewise balances only past an absolute and a relative threshold).
    bounded_load_factor: float = 1.5
    bounded_load_slack: int = 2
    session_ttl_s: float = 1800.0
    approx_ttl_s: float = 120.0  # lifetime of routed-not-reported index entries (workers without events)
    # A request's prefix is claimed for its worker as soon as it is routed, so that a concurrent request
    # with the same prefix follows it instead of prefilling it again elsewhere; KV events confirm it.
    in_flight_claim_ttl_s: float = 30.0


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: tuple[str, ...] = ()  # base URLs to attach at start
    model: str | None = None  # tokenizer source (.gguf or HF dir); None = the bundled default model
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    redis_url: str | None = None  # several replicas share the index through Redis; None = in-process
    redis_key_prefix: str = "prefixgate:"
    ingest_kv_events: bool = True  # subscribe to workers' KV events (off: approximate routing inserts only)
    api_keys: dict[str, Tenant] = field(default_factory=dict)  # empty = no auth, one default tenant
    admin_key: str | None = None  # admin routes are disabled without one
    allowed_worker_urls: tuple[str, ...] = ("http://127.0.0.1:", "http://localhost:", "http://[::1]:")
    max_body_bytes: int = 8 * 2**20
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 300.0  # a long prefill queue can take a while
    read_timeout_s: float = 120.0  # between two chunks of a stream
    health_interval_s: float = 2.0
    failure_threshold: int = 3  # consecutive failures that open a worker's circuit
    circuit_open_s: float = 10.0
    max_retries: int = 2  # other workers tried when one fails before its first byte
    recent_requests: int = 200  # kept for /stats and the dashboard (never prompt text)
