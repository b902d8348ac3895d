"""``prefixgate engine``: load a model and serve it over HTTP (OpenAI + SGLang-native APIs).

Example: ``prefixgate engine --port 30001 --kv-events-endpoint tcp://127.0.0.1:5557``.
SIGINT/SIGTERM shut down gracefully: in-flight requests get ``--shutdown-grace`` seconds to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from engine.config import EngineConfig
from engine.server.app import create_app, load_engine, start_site
from engine.server.state import ServerSettings

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
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long in-flight requests may run after SIGTERM",
    )


def run(args: argparse.Namespace) -> int:
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        page_size=args.page_size,
        max_batch_tokens=args.max_batch_tokens,
        max_running=args.max_running,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        max_model_len=args.max_model_len,
        model_id=args.model_id,
        threads=args.threads,
    )
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_token_ids=args.kv_events_token_ids,
        kv_events_allow_remote=args.kv_events_allow_remote,
        kv_events_curve_secret_key_file=args.kv_events_curve_secret_key,
        kv_events_curve_clients_dir=args.kv_events_curve_clients,
        shutdown_grace_s=args.shutdown_grace,
    )
    try:
        engine, publisher = load_engine(config, settings)
    except ValueError as exc:  # settings that would expose KV events: say what to change
        raise SystemExit(f"prefixgate engine: {exc}") from None
    return asyncio.run(_serve(create_app(engine, settings, publisher), settings))


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
