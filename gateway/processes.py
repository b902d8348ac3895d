"""``--procs N``: N gateway processes on one port (SO_REUSEPORT; the kernel spreads new connections).

One gateway process tops out on one core. N of them share what must be shared through Redis, as
replicas on different hosts do: the index log, session pins, the worker registry and the dashboard
counters (``cache.index.redis_store``, ``gateway.shared_state``). Without Redis each process would route
from its own index and count on its own, so N > 1 without ``--redis`` is refused.

The parent only supervises: each child runs the whole gateway (its own event loop, tokenizer, KV-event
subscriptions); the children die with the parent however it dies (parent-death signal), and when one
child exits the others are stopped, so a service manager sees the failure.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable

from gateway.config import GatewayConfig

log = logging.getLogger(__name__)


def check_procs(procs: int, config: GatewayConfig) -> str | None:
    """Why ``procs`` processes cannot serve ``config``, or None if they can."""
    if procs < 1:
        return "--procs must be at least 1"
    if procs > 1 and not config.redis_url:
        return (
            f"--procs {procs} needs --redis: the processes share the index, session pins and counters "
            "through it (without it each would route from its own partial view)"
        )
    if procs > 1 and sys.platform != "linux":
        return "--procs > 1 needs SO_REUSEPORT load balancing (Linux)"
    return None


def serve_processes(
    config: GatewayConfig, procs: int, serve: Callable[[GatewayConfig], None], log_level: str
) -> int:
    """Run ``serve(config)`` in ``procs`` child processes until one exits or this one is told to stop;
    returns the exit status (the first child's failure, else 0)."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited event loop or threads
    children = [
        context.Process(target=_child, args=(serve, config, os.getpid(), log_level), name=f"gateway-{i}")
        for i in range(procs)
    ]
    for child in children:
        child.start()
    log.info(
        "gateway: %d processes on %s:%d (pids %s)", procs, config.host, config.port, [c.pid for c in children]
    )
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)  # type: ignore[arg-type]

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        multiprocessing.connection.wait([c.sentinel for c in children])
        failed = next((c for c in children if c.exitcode not in (None, 0)), None)
        if not stopping:
            exited = failed or next(c for c in children if c.exitcode is not None)
            log.error("gateway process %s exited (code %s); stopping the others", exited.pid, exited.exitcode)
        stop(signal.SIGTERM, None)
        for child in children:
            child.join()
        return 0 if stopping else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _child(
    serve: Callable[[GatewayConfig], None], config: GatewayConfig, parent: int, log_level: str
) -> None:
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the parent
        if os.getppid() != parent:
            os._exit(1)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )
    serve(config)
