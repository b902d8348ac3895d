"""Gateway configuration, built once from the command line and passed down.

Fields with ``help`` metadata are command-line flags (``cache.api.flags``); the others are set in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tenant:
    name: str
    salt: str  # enters the block-hash namespace and the worker's cache key (vLLM's ``cache_salt``)


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = field(default="cache_aware", metadata={"help": "how to choose a worker"})
    host_tier_weight: float = field(
        default=0.5,
        metadata={
            "help": "what a prefix cached on a host or disk tier saves, as a fraction of a device-tier hit, "
            "until the worker reports its measured load-back cost (GET /load_profile)"
        },
    )
    load_cost_tokens: int = field(
        default=128,
        metadata={
            "help": "cache_aware cost = uncached prompt tokens + this x in-flight requests on the worker"
        },
    )
    # Bounded-load guard. The slack keeps small absolute imbalances, which cost little, from overriding
    # cache affinity (SGLang's router likewise balances only past an absolute and a relative threshold).
    bounded_load_factor: float = field(
        default=1.5,
        metadata={
            "help": "a worker takes no more requests (whatever it caches) once its load would exceed both "
            "this x the mean load and the least loaded worker's + --bounded-load-slack"
        },
    )
    bounded_load_slack: int = field(
        default=2, metadata={"help": "requests over the least loaded worker's load that never count as hot"}
    )
    # KV transfer (gateway/fetch_plans.py, docs/kv-transfer.md): a worker chosen for a request whose longer
    # prefix a peer holds pulls it from the peer instead of recomputing it.
    kv_fetch_plans: bool = field(
        default=True,
        metadata={
            "help": "never attach a kv_fetch_plan (by default one goes with a request whose chosen worker "
            "lacks a prefix a peer holds, when both run --kv-transfer with equal KV layouts)",
            "flag": "--no-kv-fetch-plans",
        },
    )
    kv_fetch_min_tokens: int = field(
        default=256,
        metadata={"help": "attach a fetch plan only when the chosen worker would receive this many tokens"},
    )
    kv_fetch_plan_ttl_s: float = 10.0  # a plan expires this long after routing (clocks must agree)
    # Retention (gateway/retention.py): prompt_cache_retention and cache_control ttls as engine pins.
    max_retention_s: float = field(
        default=86400.0,
        metadata={
            "help": "longest that our engine workers hold a prefix for a client's prompt_cache_retention "
            "(in_memory: 600 s, 24h) or cache_control ttl (5m, 1h); 0: never pin"
        },
    )
    session_ttl_s: float = 1800.0
    approx_ttl_s: float = 120.0  # lifetime of routed-not-reported index entries (workers without events)
    # A request's prefix is claimed for its worker as soon as it is routed, so that a concurrent request
    # with the same prefix follows it instead of prefilling it again elsewhere; KV events confirm it.
    in_flight_claim_ttl_s: float = 30.0
    pd_min_remote_prefill_tokens: int = field(
        default=256,
        metadata={
            "help": "prefill/decode disaggregation: a prompt whose part not cached on its decode worker is "
            "shorter than this is prefilled by the decode worker itself (moving KV would cost more)",
            "flag": "--pd-min-prefill-tokens",
        },
    )


@dataclass(frozen=True)
class GatewayConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "listen address (default: loopback only)"})
    port: int = field(default=8080, metadata={"help": "listen port"})
    workers: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "a worker's base URL (our engine, SGLang, or any OpenAI-compatible server)",
            "flag": "--worker",
            "metavar": "URL",
        },
    )
    prefill_workers: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "a prefill worker of a disaggregated pool (our engine --role prefill, SGLang "
            "--disaggregation-mode prefill, or a vLLM kv_producer); repeatable",
            "flag": "--prefill",
            "metavar": "URL",
        },
    )
    decode_workers: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "a decode worker of a disaggregated pool (it also prefills short prompts itself); "
            "repeatable",
            "flag": "--decode",
            "metavar": "URL",
        },
    )
    worker_dns: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "a DNS name whose addresses are workers (a Kubernetes headless service), resolved every "
            "--worker-dns-interval: new addresses are attached, vanished ones drained; repeatable",
            "flag": "--worker-dns",
            "metavar": "HOST:PORT",
        },
    )
    worker_dns_interval_s: float = field(
        default=10.0, metadata={"help": "seconds between two resolutions of --worker-dns names"}
    )
    worker_events: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "a worker's KV-event PUB address (for SGLang/vLLM workers whose server info does not "
            "reveal it): URL=tcp://host:port to connect to, URL=bind:tcp://host:port for a gateway-bound "
            "one (the engine connects); then ,replay=tcp://host:port for the engine's replay socket and "
            ",dp=N for N data-parallel ranks (ports + rank); repeatable",
            "flag": "--worker-events",
            "metavar": "URL=ENDPOINT[,replay=ENDPOINT][,dp=N]",
        },
    )
    model: str | None = field(
        default=None, metadata={"help": "tokenizer source (.gguf or HF dir); default: bundled model"}
    )
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    redis_url: str | None = field(  # None: the index and shared state stay in this process
        default=None,
        metadata={
            "help": "share the index with other replicas: redis://host:port/db, Redis Sentinel "
            "redis+sentinel://[:password@]host:port[,host:port...]/service[/db], or Redis Cluster "
            "redis+cluster://[:password@]host:port[,host:port...]",
            "flag": "--redis",
            "metavar": "URL",
        },
    )
    redis_key_prefix: str = field(default="prefixgate:", metadata={"help": "prefix of every Redis key"})
    ingest_kv_events: bool = field(  # off: the index learns from approximate routing inserts only
        default=True, metadata={"help": "do not subscribe to workers' KV events", "flag": "--no-kv-events"}
    )
    kv_events_curve_key: str | None = field(
        default=None,
        metadata={
            "help": "this gateway's CURVE secret certificate (zmq.auth .key_secret) for workers that encrypt "
            "KV events and list their clients; default: a fresh key per connection",
            "metavar": "FILE",
        },
    )
    api_keys: dict[str, Tenant] = field(default_factory=dict)  # empty = no auth, one default tenant
    admin_key: str | None = None  # admin routes are disabled without one; never a flag (ps shows flags)
    metrics_key: str | None = None  # read-only key for /stats and /metrics (env, never a flag)
    allowed_worker_urls: tuple[str, ...] = field(
        default=("http://127.0.0.1:", "http://localhost:", "http://[::1]:"),
        metadata={
            "help": "scheme://host[:port] admins may attach (no port: any port; default: loopback only)",
            "flag": "--allow-worker-url",
            "metavar": "ORIGIN",
        },
    )
    max_body_bytes: int = 8 * 2**20
    max_context_tokens: int | None = field(
        default=None,
        metadata={"help": "cap on prompt tokens (default: the smallest context_length the workers report)"},
    )
    max_upstream_body_bytes: int = 64 * 2**20  # a non-streamed answer larger than this is a worker failure
    client_timeout_s: float = field(
        default=60.0,
        metadata={"help": "seconds a client may take to send its headers, or its body (slowloris guard)"},
    )
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 300.0  # a long prefill queue can take a while
    read_timeout_s: float = 120.0  # between two chunks of a stream
    health_interval_s: float = 2.0
    failure_threshold: int = 3  # consecutive failures that open a worker's circuit
    circuit_open_s: float = 10.0
    max_retries: int = 2  # other workers tried when one fails before its first byte
    recent_requests: int = 200  # kept for /stats and the dashboard (never prompt text)
    # P:D advice (gateway/pd_advisor.py, docs/disaggregation.md): the targets the advised worker counts meet.
    ttft_slo_ms: float = field(
        default=500.0, metadata={"help": "P:D advice: time-to-first-token target (Dynamo's planner default)"}
    )
    itl_slo_ms: float = field(
        default=50.0, metadata={"help": "P:D advice: inter-token latency target (Dynamo's planner default)"}
    )
    pd_advice_window_s: float = 60.0  # the workload the advice sizes for: requests served this recently
