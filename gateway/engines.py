"""The command lines of SGLang and vLLM workers, as ``prefixgate serve --engine sglang|vllm`` starts them.

Pure: nothing is started here (``gateway.supervisor`` does that). Each worker listens on loopback with
KV events on, published to a loopback endpoint the gateway binds (``EngineLaunch.events``): SGLang and
vLLM connect their PUB socket to a non-wildcard endpoint, so nothing of theirs listens beyond loopback
but the HTTP port. SGLang pages are 16 tokens (``--page-size 16``), vLLM's default blocks are 16 too: the
gateway's blocks then equal the engine's pages.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.event_sources import BIND_PREFIX
from gateway.launcher import HOST

ENGINES = ("prefixgate", "sglang", "vllm")
PAGE_SIZE = 16


@dataclass(frozen=True)
class EngineLaunch:
    """One worker to start and supervise."""

    command: list[str]
    url: str  # its HTTP base URL
    events: str  # ``--worker-events`` spec: the gateway binds the endpoint the engine publishes to
    env: dict[str, str] = field(default_factory=dict)  # added to the environment (CUDA_VISIBLE_DEVICES)


def events_config(events_port: int, engine: str) -> str:
    """The ``--kv-events-config`` JSON both engines parse (SGLang's and vLLM's ``KVEventsConfig``)."""
    config: dict[str, object] = {
        "publisher": "zmq",
        "endpoint": f"tcp://{HOST}:{events_port}",
        "topic": "",
    }
    if engine == "vllm":  # vLLM publishes nothing unless told to
        config = {"enable_kv_cache_events": True, **config}
    return json.dumps(config, separators=(",", ":"))


def sglang_command(
    model: str, port: int, events_port: int, *, tensor_parallel: int = 1, extra: Sequence[str] = ()
) -> list[str]:
    """``python -m sglang.launch_server`` for one worker; ``extra`` passes through (HiCache flags such as
    ``--enable-hierarchical-cache --hicache-ratio 2``, ``--mem-fraction-static``, ...)."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model]
    cmd += ["--host", HOST, "--port", str(port), "--page-size", str(PAGE_SIZE)]
    cmd += ["--kv-events-config", events_config(events_port, "sglang")]
    if tensor_parallel > 1:
        cmd += ["--tp-size", str(tensor_parallel)]
    return cmd + list(extra)


def vllm_command(
    model: str, port: int, events_port: int, *, tensor_parallel: int = 1, extra: Sequence[str] = ()
) -> list[str]:
    """``vllm serve`` for one worker (prefix caching is on by default in vLLM's V1 engine)."""
    cmd = ["vllm", "serve", model, "--host", HOST, "--port", str(port)]
    cmd += ["--kv-events-config", events_config(events_port, "vllm")]
    if tensor_parallel > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel)]
    return cmd + list(extra)


def plan(
    engine: str,
    model: str,
    gpu_groups: Sequence[Sequence[int]],
    ports: Sequence[int],
    extra: Sequence[str] = (),
) -> list[EngineLaunch]:
    """One worker per GPU group (tensor parallel over the group's GPUs); ``ports``: two per worker
    (HTTP, KV events), e.g. from ``gateway.launcher.free_ports``."""
    if engine not in ("sglang", "vllm"):
        raise ValueError(f"no command line for engine {engine!r}")
    if len(ports) < 2 * len(gpu_groups):
        raise ValueError(f"{len(gpu_groups)} workers need {2 * len(gpu_groups)} ports")
    build = sglang_command if engine == "sglang" else vllm_command
    launches = []
    for i, gpus in enumerate(gpu_groups):
        port, events_port = ports[2 * i], ports[2 * i + 1]
        url = f"http://{HOST}:{port}"
        launches.append(
            EngineLaunch(
                command=build(model, port, events_port, tensor_parallel=len(gpus), extra=extra),
                url=url,
                events=f"{url}={BIND_PREFIX}tcp://{HOST}:{events_port}",
                env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))},
            )
        )
    return launches


def parse_gpu_groups(specs: Sequence[str], workers: int) -> list[list[int]]:
    """``--gpus 0,1 --gpus 2,3`` -> ``[[0, 1], [2, 3]]``; none given: one GPU per worker."""
    if not specs:
        return [[i] for i in range(workers)]
    groups = []
    for spec in specs:
        try:
            group = [int(g) for g in spec.split(",")]
        except ValueError:
            raise ValueError(f"--gpus {spec!r}: expected comma-separated GPU indices, e.g. 0,1") from None
        if not group or min(group) < 0:
            raise ValueError(f"--gpus {spec!r}: expected comma-separated GPU indices, e.g. 0,1")
        groups.append(group)
    used = [g for group in groups for g in group]
    if len(used) != len(set(used)):
        raise ValueError("--gpus: a GPU is in two groups")
    return groups
