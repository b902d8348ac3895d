"""``prefixgate engine``: load a model and serve it over HTTP (OpenAI + SGLang-native APIs).

Example: ``prefixgate engine --port 30001 --kv-events-endpoint tcp://127.0.0.1:5557``.
SIGINT/SIGTERM shut down gracefully: in-flight requests get ``--shutdown-grace`` seconds to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from cache.api.flags import FlagError, add_config_arguments, check_can_listen, config_from_args
from cache.prompt.model_files import WeightLoadError, check_model_path
from engine.config import TIERS, WRITE_POLICIES, EngineConfig
from engine.models.quant_linear import WEIGHT_MODES
from engine.server.app import create_app, load_engine, start_site
from engine.server.state import ServerSettings
from engine.transfer.config import TRANSFER, TransferConfig

log = logging.getLogger(__name__)


GROUPS = {
    TIERS: (
        "KV tiers (SGLang HiCache's flags)",
        "a host pool under the device pool and an optional disk tier; evicted prefixes are demoted, "
        "and loaded back when copying is measured cheaper than recomputing",
    ),
    TRANSFER: (
        "KV transfer (docs/kv-transfer.md)",
        "pull a cached prefix from a peer engine when a request carries a fetch plan, and serve "
        "this engine's cached prefixes to peers (Mooncake's Transfer Engine)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag comes from a config field (``cache.api.flags``): ServerSettings, EngineConfig, and
    TransferConfig under ``--kv-transfer``."""
    add_config_arguments(parser, ServerSettings)
    choices = {"weights": {"choices": WEIGHT_MODES}, "hicache_write_policy": {"choices": WRITE_POLICIES}}
    add_config_arguments(parser, EngineConfig, overrides=choices, groups=GROUPS)
    add_config_arguments(parser, TransferConfig, groups=GROUPS)
    parser.add_argument("--kv-transfer", action="store_true", help="run the KV transfer service")


def run(args: argparse.Namespace) -> int:
    """Flags that cannot work (``FlagError``: one line, exit status 2): a ``--model`` that is not a
    model and a ``--port`` already taken (both checked before the slow load), inconsistent flags (a disk tier without the hierarchical
    cache, a remote KV-event endpoint...), a checkpoint the loader refuses."""
    try:
        check_model_path(args.model, weights=True)
    except WeightLoadError as exc:
        raise FlagError(f"--model: {exc}") from None
    try:
        config = config_from_args(EngineConfig, args)
        transfer = None
        if args.kv_transfer or args.role != "mixed":  # a prefill or decode worker moves KV
            transfer = config_from_args(TransferConfig, args, import_buffer_mib=args.kv_transfer_buffer_mib)
        settings = config_from_args(ServerSettings, args, kv_transfer=transfer)
        check_can_listen(settings.host, settings.port)  # a taken port is found before the model loads
        engine, publisher = load_engine(config, settings)
    except ValueError as exc:
        raise FlagError(str(exc)) from None
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
