"""SGLang's own router (PyPI ``sglang-router``) in front of two prefixgate engine workers.

Starts two ``prefixgate engine`` workers and ``python -m sglang_router.launch_router`` (normal mode),
every listener on 127.0.0.1 (the router's own defaults bind 0.0.0.0 for both its HTTP port and its
Prometheus port), registers the workers with ``--worker-urls``, routes ``/generate`` and
``/v1/chat/completions`` through the router, and checks that both workers served requests.

    python scripts/sglang_router_demo.py            # prints a summary, exits 0 on success

``tests/engine/server/test_sglang_router.py`` runs ``main()`` as a (slow) test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from gateway.launcher import HOST, engine_workers, free_port, free_ports

__all__ = ["REPO", "free_port", "http", "main", "wait_until"]  # free_port: tests/engine use it
REPO = Path(__file__).resolve().parent.parent


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc).encode()


def wait_until(check, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def start(stack: ExitStack, cmd: list[str], log_path: Path) -> subprocess.Popen:
    log = stack.enter_context(open(log_path, "wb"))  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(stop)
    return proc


def listening_addresses(pid: int) -> list[str]:
    """TCP listeners of ``pid`` (from ``ss``; empty when ``ss`` is unavailable)."""
    try:
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def worker_requests(url: str) -> float:
    _, text = http("GET", url + "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith("prefixgate_engine_requests_total{")
    )


def main(log_dir: Path | None = None, verbose: bool = True) -> dict:
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "prefixgate-router-demo"
    log_dir.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    summary: dict = {}
    with ExitStack() as stack:
        engine_args = ["--kv-cache-tokens", "2048", "--threads", "1"]
        launched = stack.enter_context(
            engine_workers(
                2, extra=engine_args, timeout=180, kv_events=False, log_dir=log_dir, log_level="WARNING"
            )
        )
        workers = [w.url for w in launched]
        say("workers up:", workers)

        router_port, prometheus_port = free_ports(2)
        router_cmd = [
            sys.executable,
            "-m",
            "sglang_router.launch_router",
            "--host",
            HOST,
            "--port",
            str(router_port),
            "--prometheus-host",
            HOST,
            "--prometheus-port",
            str(prometheus_port),
            "--policy",
            "round_robin",
            "--log-level",
            "warn",
            "--worker-urls",
            *workers,
        ]
        router = start(stack, router_cmd, log_dir / "router.log")
        router_url = f"http://{HOST}:{router_port}"
        generate_body = {
            "text": "The capital of France is",
            "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        }
        wait_until(
            lambda: http("POST", router_url + "/generate", generate_body, 30)[0] == 200, "router", 120, router
        )
        summary["router_command"] = " ".join(router_cmd[1:])
        summary["router_listeners"] = listening_addresses(router.pid)
        assert all(addr.startswith(HOST + ":") for addr in summary["router_listeners"]), summary[
            "router_listeners"
        ]

        before = [worker_requests(url) for url in workers]
        status, body = http("POST", router_url + "/generate", generate_body)
        assert status == 200, body
        generated = json.loads(body)
        assert generated["meta_info"]["finish_reason"]["type"] in ("length", "stop") and generated["text"]
        summary["generate"] = generated["text"]
        chat_body = {
            "model": "SmolLM2-135M-Instruct.Q4_1",
            "max_tokens": 5,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}],
        }
        for _ in range(3):
            status, body = http("POST", router_url + "/v1/chat/completions", chat_body)
            assert status == 200, body
            chat = json.loads(body)
            assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
        summary["chat"] = chat["choices"][0]["message"]["content"]
        summary["chat_usage"] = chat["usage"]
        served = [worker_requests(url) - b for url, b in zip(workers, before, strict=True)]
        summary["requests_per_worker"] = served
        assert sum(served) == 4 and all(n > 0 for n in served), served
        say(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args()
    main(args.log_dir)
