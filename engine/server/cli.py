"""``prefixgate engine``: load a model and serve it over HTTP (OpenAI + SGLang-native APIs).

Example: ``prefixgate engine --port 30001 --kv-events-endpoint tcp://127.0.0.1:5557``.
SIGINT/SIGTERM shut down gracefully: in-flight requests get ``--shutdown-grace`` seconds to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from engine.config import WRITE_POLICIES, EngineConfig
from engine.models.quant_linear import WEIGHT_MODES
from engine.server.app import create_app, load_engine, start_site
from engine.server.state import ServerSettings
from engine.transfer.config import TransferConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    parser.add_argument(
        "--model",
        default=None,
        help=".gguf file or Hugging Face directory (default: bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--model-id", default=None, help="name served over the API (default: from the file name)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument(
        "--kv-events-endpoint",
        default=None,
        metavar="ZMQ_ADDR",
        help="publish KV cache events on this ZMQ PUB address, e.g. tcp://127.0.0.1:5557 "
        "(other hosts' addresses need --kv-events-curve-secret-key or --kv-events-allow-remote)",
    )
    parser.add_argument(
        "--kv-events-token-ids",
        action="store_true",
        help="include prompt token ids in BlockStored events (they reveal every tenant's prompt text)",
    )
    parser.add_argument(
        "--kv-events-allow-remote",
        action="store_true",
        help="allow a non-loopback KV event endpoint without encryption",
    )
    parser.add_argument(
        "--kv-events-curve-secret-key",
        default=None,
        metavar="FILE",
        help="encrypt KV events with ZMQ CURVE: this server's secret key (zmq.curve_keypair()'s "
        "40-character Z85 secret, or a .key_secret certificate); subscribers need its public key",
    )
    parser.add_argument(
        "--kv-events-curve-clients",
        default=None,
        metavar="DIR",
        help="with CURVE: only clients whose public-key certificates are in DIR may subscribe",
    )
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=defaults.dtype, help="auto | float32 | bfloat16 | float16")
    parser.add_argument(
        "--weights",
        default=defaults.weights,
        choices=WEIGHT_MODES,
        help="matmul weights: auto (int4 on CPU with bf16, else float) | float | int8 | int4 (CPU)",
    )
    parser.add_argument(
        "--page-size", type=int, default=defaults.page_size, help="tokens per KV page (and hashed block)"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=defaults.max_batch_tokens, help="per-step token budget"
    )
    parser.add_argument("--max-running", type=int, default=defaults.max_running, help="concurrent sequences")
    parser.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool capacity in tokens")
    parser.add_argument(
        "--kv-cache-memory-gib",
        type=float,
        default=defaults.kv_cache_memory_gib,
        help="KV pool size when --kv-cache-tokens is not given",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_hicache_arguments(parser, defaults)
    _add_kv_transfer_arguments(parser)
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long in-flight requests may run after SIGTERM",
    )


def _add_hicache_arguments(parser: argparse.ArgumentParser, defaults: EngineConfig) -> None:
    tiers = parser.add_argument_group(
        "KV tiers (SGLang HiCache's flags)",
        "a host pool under the device pool and an optional disk tier; evicted prefixes are demoted, "
        "and loaded back when copying is measured cheaper than recomputing",
    )
    tiers.add_argument(
        "--enable-hierarchical-cache",
        action="store_true",
        help="keep prefixes evicted from the device pool in host memory (and on disk, with --hicache-disk-dir)",
    )
    tiers.add_argument(
        "--hicache-ratio",
        type=float,
        default=defaults.hicache_ratio,
        help="host pool size as a multiple of the device pool (default: %(default)s)",
    )
    tiers.add_argument(
        "--hicache-size",
        type=float,
        default=defaults.hicache_size_gib,
        metavar="GIB",
        help="host pool size in GiB; overrides --hicache-ratio when > 0",
    )
    tiers.add_argument(
        "--hicache-write-policy",
        choices=WRITE_POLICIES,
        default=defaults.hicache_write_policy,
        help="when a device page gets its host copy: at insert (write_through), at its second hit "
        "(write_through_selective) or at eviction (write_back) (default: %(default)s)",
    )
    tiers.add_argument(
        "--hicache-disk-dir",
        default=None,
        metavar="DIR",
        help="disk tier: page files (checksummed) that a restarted engine serves from",
    )
    tiers.add_argument(
        "--hicache-disk-size",
        type=float,
        default=defaults.hicache_disk_size_gib,
        metavar="GIB",
        help="disk tier capacity (default: %(default)s)",
    )
    tiers.add_argument(
        "--hicache-min-load-tokens",
        type=int,
        default=defaults.hicache_min_load_tokens,
        help="shorter lower-tier prefixes are recomputed, never loaded back (default: %(default)s)",
    )


def _add_kv_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TransferConfig()
    group = parser.add_argument_group(
        "KV transfer (docs/kv-transfer.md)",
        "pull a cached prefix from a peer engine when a request carries a fetch plan, and serve "
        "this engine's cached prefixes to peers (Mooncake's Transfer Engine)",
    )
    group.add_argument("--kv-transfer", action="store_true", help="run the KV transfer service")
    group.add_argument(
        "--kv-transfer-host",
        default=defaults.host,
        help="address the transfer engine listens on (default: %(default)s; peers read from it)",
    )
    group.add_argument(
        "--kv-transfer-buffer-mib",
        type=int,
        default=defaults.export_buffer_mib,
        help="export and import staging memory, each (default: %(default)s MiB)",
    )
    group.add_argument(
        "--kv-transfer-timeout",
        type=float,
        default=defaults.timeout_s,
        metavar="SECONDS",
        help="one fetch, end to end, before the request recomputes (default: %(default)s)",
    )
    group.add_argument(
        "--kv-transfer-lease-ttl",
        type=float,
        default=defaults.lease_ttl_s,
        metavar="SECONDS",
        help="staged pages a reader never released are freed after this (default: %(default)s)",
    )


def _transfer_config(args: argparse.Namespace) -> TransferConfig | None:
    if not args.kv_transfer:
        return None
    return TransferConfig(
        host=args.kv_transfer_host,
        export_buffer_mib=args.kv_transfer_buffer_mib,
        import_buffer_mib=args.kv_transfer_buffer_mib,
        timeout_s=args.kv_transfer_timeout,
        lease_ttl_s=args.kv_transfer_lease_ttl,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = _engine_config(args)
    except ValueError as exc:  # inconsistent flags (e.g. a disk tier without the hierarchical cache)
        raise SystemExit(f"prefixgate engine: {exc}") from None
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_token_ids=args.kv_events_token_ids,
        kv_events_allow_remote=args.kv_events_allow_remote,
        kv_events_curve_secret_key_file=args.kv_events_curve_secret_key,
        kv_events_curve_clients_dir=args.kv_events_curve_clients,
        shutdown_grace_s=args.shutdown_grace,
        kv_transfer=_transfer_config(args),
    )
    try:
        engine, publisher = load_engine(config, settings)
    except ValueError as exc:  # settings that would expose KV events: say what to change
        raise SystemExit(f"prefixgate engine: {exc}") from None
    return asyncio.run(_serve(create_app(engine, settings, publisher), settings))


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        page_size=args.page_size,
        max_batch_tokens=args.max_batch_tokens,
        max_running=args.max_running,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        max_model_len=args.max_model_len,
        model_id=args.model_id,
        threads=args.threads,
        enable_hierarchical_cache=args.enable_hierarchical_cache,
        hicache_ratio=args.hicache_ratio,
        hicache_size_gib=args.hicache_size,
        hicache_write_policy=args.hicache_write_policy,
        hicache_disk_dir=args.hicache_disk_dir,
        hicache_disk_size_gib=args.hicache_disk_size,
        hicache_min_load_tokens=args.hicache_min_load_tokens,
    )


async def _serve(app, settings: ServerSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner, port = await start_site(app, settings.host, settings.port)
    log.info("serving on http://%s:%d", settings.host, port)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()
    return 0
