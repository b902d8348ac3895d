"""The SGLang and vLLM command lines ``prefixgate serve --engine`` builds (pure: nothing is started)."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import sglang
import sglang.srt.disaggregation.kv_events as sglang_events

from gateway.engines import EngineLaunch, parse_gpu_groups, plan
from tests.cache.index import vllm_kv_events as vllm

SGLANG_SERVER_ARGS = Path(sglang.__file__).parent / "srt" / "server_args.py"


def sglang_flags() -> set[str]:
    """Every flag SGLang 0.5.2's ``ServerArgs.add_cli_args`` defines (read from its source: importing it
    needs SGLang's full dependency set)."""
    tree = ast.parse(SGLANG_SERVER_ARGS.read_text())
    return {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")
    }


def test_sglang_command_lines() -> None:
    hicache = ["--enable-hierarchical-cache", "--hicache-ratio", "2"]
    launches = plan("sglang", "/models/llama", [[0], [1, 2]], [30000, 30001, 30002, 30003], hicache)
    events_config = '{"publisher":"zmq","endpoint":"tcp://127.0.0.1:30001","topic":""}'
    assert launches[0] == EngineLaunch(
        command=[
            *(sys.executable, "-m", "sglang.launch_server", "--model-path", "/models/llama"),
            *("--host", "127.0.0.1", "--port", "30000", "--page-size", "16"),
            *("--kv-events-config", events_config, *hicache),
        ],
        url="http://127.0.0.1:30000",
        events="http://127.0.0.1:30000=bind:tcp://127.0.0.1:30001",
        env={"CUDA_VISIBLE_DEVICES": "0"},
    )
    second = launches[1]
    assert second.command[second.command.index("--tp-size") + 1] == "2"
    assert second.env == {"CUDA_VISIBLE_DEVICES": "1,2"} and second.url == "http://127.0.0.1:30002"
    for launch in launches:  # every flag is one SGLang defines, and its events config is one it parses
        flags = [a for a in launch.command[3:] if a.startswith("--")]
        assert set(flags) <= sglang_flags()
        config = launch.command[launch.command.index("--kv-events-config") + 1]
        parsed = sglang_events.KVEventsConfig.from_cli(config)
        assert (parsed.publisher, parsed.topic) == ("zmq", "")
        assert not sglang_events.ZmqEventPublisher.offset_endpoint_port(parsed.endpoint, 0).count("*")


def test_vllm_command_lines() -> None:
    (launch,) = plan("vllm", "/models/llama", [[3, 4]], [8000, 8001])
    assert launch.command[:6] == ["vllm", "serve", "/models/llama", "--host", "127.0.0.1", "--port"]
    config = json.loads(launch.command[launch.command.index("--kv-events-config") + 1])
    assert config == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:8001",
        "topic": "",
    }
    assert launch.command[-2:] == ["--tensor-parallel-size", "2"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "3,4"}
    kv = vllm.load()
    if kv is None:
        return  # vLLM (installed --no-deps by scripts/setup.sh) checks the rest
    # every flag is one of vLLM's argument dataclasses, and the events config one its KVEventsConfig takes
    assert {a for a in launch.command[3:] if a.startswith("--")} <= vllm_flags()
    parsed = kv.KVEventsConfig(**config)  # a pydantic dataclass that forbids unknown fields, as in vLLM
    assert (parsed.enable_kv_cache_events, parsed.publisher, parsed.endpoint) == (
        True,
        "zmq",
        "tcp://127.0.0.1:8001",
    )


def vllm_flags() -> set[str]:
    """The flags of vLLM's ``EngineArgs`` and ``FrontendArgs`` (its CLI makes one per dataclass field),
    read from their source: importing them needs vLLM's full dependency set."""
    root = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])  # type: ignore[union-attr]
    flags = set()
    for path, classes in (
        (root / "engine" / "arg_utils.py", {"EngineArgs"}),
        (root / "entrypoints" / "common" / "cli_args.py", {"BaseFrontendArgs", "FrontendArgs"}),
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in classes:
                flags |= {
                    "--" + field.target.id.replace("_", "-")
                    for field in node.body
                    if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                }
    return flags


def test_gpu_groups() -> None:
    assert parse_gpu_groups([], 3) == [[0], [1], [2]]
    assert parse_gpu_groups(["0,1", "2,3"], 1) == [[0, 1], [2, 3]]
    for bad in (["0,x"], ["0,1", "1,2"], ["-1"]):
        with pytest.raises(ValueError, match="--gpus"):
            parse_gpu_groups(bad, 1)
    with pytest.raises(ValueError, match="ports"):
        plan("sglang", "m", [[0], [1]], [1, 2, 3])
