"""The ``prefixgate`` command line: bad flags are one line and exit 2, found before any worker starts;
help shows every default."""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.api.flags import FlagError
from gateway import cli, launcher
from gateway.launcher import free_port
from gateway.run import api_keys_from_args
from tests.gateway.test_launcher import _alive


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["gateway", "--log-level", "verbose"], "invalid choice: 'verbose'"),
        (["--log-level", "loud", "gateway"], "invalid choice: 'loud'"),
        (
            ["gateway", "--admin-key", "SECRET"],
            "unrecognized arguments: --admin-key SECRET",
        ),  # no abbreviation
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, complaint, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and complaint in err and "Traceback" not in err


def test_log_level_is_accepted_before_or_after_the_subcommand() -> None:
    assert cli.build_parser(["gateway"]).parse_args(["--log-level", "DEBUG", "gateway"]).log_level == "debug"
    assert (
        cli.build_parser(["gateway"]).parse_args(["gateway", "--log-level", "warning"]).log_level == "warning"
    )
    assert cli.build_parser(["gateway"]).parse_args(["gateway"]).log_level == "info"


def test_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["gateway", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8080)" in out and "(default: cache_aware)" in out


# -- fail fast: every flag that cannot work is one line and exit status 2, before any worker starts --------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.json").write_text("{}")
    (root / "list.json").write_text('["key"]')
    (root / "flat.json").write_text('{"sk-1": "acme"}')
    (root / "typo.json").write_text('{"sk-1": {"tennant": "acme"}}')
    (root / "not-a-model.gguf").write_text("hello")
    (root / "empty-dir").mkdir()
    return root


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as held:
        yield held.getsockname()[1]


BAD_SETUPS = {
    "no workers": (["serve", "--workers", "0"], "--workers 0: start at least 1"),
    "negative workers": (["serve", "--workers", "-1"], "--workers -1: start at least 1"),
    "prefill without decode": (
        ["serve", "--prefill-workers", "1"],
        "disaggregation needs at least 1 of each",
    ),
    "missing model": (["serve", "--model", "{bad}/missing.gguf"], "missing.gguf: no such file"),
    "not a model": (["serve", "--model", "{bad}/not-a-model.gguf"], "not a GGUF file"),
    "not a model dir": (["serve", "--model", "{bad}/empty-dir"], "is not a model directory"),
    "engine, not a model": (["engine", "--model", "{bad}/not-a-model.gguf"], "not a GGUF file"),
    "empty keys": (["serve", "--api-keys", "{bad}/empty.json"], "--allow-empty-api-keys"),
    "keys not an object": (["serve", "--api-keys", "{bad}/list.json"], "not an array"),
    "key without tenant": (["gateway", "--api-keys", "{bad}/flat.json"], "entry 1: expected"),
    "keys field typo": (["gateway", "--api-keys", "{bad}/typo.json"], "unknown field 'tennant'"),
    "missing keys file": (["serve", "--api-keys", "{bad}/none.json"], "none.json: no such file"),
    "serve port taken": (["serve", "--port", "{port}"], "is already in use"),
    "gateway port taken": (["gateway", "--port", "{port}"], "is already in use"),
    "engine port taken": (["engine", "--port", "{port}"], "is already in use"),
}


def bad_argv(name: str, bad_files: Path, port: int) -> list[str]:
    argv = [a.format(bad=bad_files, port=port) for a in BAD_SETUPS[name][0]]
    if argv[0] == "gateway":
        argv += ["--worker", "http://127.0.0.1:1"]  # nothing listens there: never contacted
    return argv


@pytest.mark.parametrize("name", BAD_SETUPS)
def test_a_flag_that_cannot_work_is_one_line_and_exit_2_before_any_worker_starts(
    name: str,
    bad_files: Path,
    taken_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_spawning(*_: object, **__: object) -> None:
        raise AssertionError("a worker was started")

    monkeypatch.setattr(launcher, "spawn", no_spawning)
    argv = bad_argv(name, bad_files, taken_port)
    assert cli.main(argv) == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert BAD_SETUPS[name][1] in line
    assert next(a for a in argv if a.startswith("--")) in line  # it names the flag


@pytest.mark.slow  # a process per setup
def test_as_processes_each_bad_setup_writes_one_line_to_stderr_and_exits_2(
    bad_files: Path, taken_port: int
) -> None:
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *bad_argv(name, bad_files, taken_port)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in BAD_SETUPS
    }
    for name, run in runs.items():
        _, err = run.communicate(timeout=300)
        lines = err.splitlines()
        assert run.returncode == 2, (name, err)
        assert len(lines) == 1 and BAD_SETUPS[name][1] in lines[0], (name, err)  # no traceback


def test_an_empty_keys_file_is_taken_only_when_meant(bad_files: Path) -> None:
    parser = cli.build_parser(["gateway"])
    args = parser.parse_args(["gateway", "--api-keys", str(bad_files / "empty.json")])
    with pytest.raises(FlagError, match="lists no key"):
        api_keys_from_args(args)
    args = parser.parse_args(
        ["gateway", "--api-keys", str(bad_files / "empty.json"), "--allow-empty-api-keys"]
    )
    assert api_keys_from_args(args) == {}


@pytest.mark.slow  # starts a real engine worker
def test_ctrl_c_while_the_engines_load_stops_them_without_a_traceback() -> None:
    serve = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port())],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stderr is not None
        seen = []
        while not any("starting at" in line for line in seen):  # the engine worker was spawned
            seen.append(serve.stderr.readline())
            assert seen[-1], f"serve ended before starting a worker: {seen}"
        worker_pid = int(re.search(r"\(pid (\d+)", seen[-1]).group(1))  # type: ignore[union-attr]
        serve.send_signal(signal.SIGINT)
        rest = serve.stderr.read()
        assert serve.wait(timeout=60) == 130
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert "Traceback" not in rest and "interrupted" in rest, rest
    assert not _alive(worker_pid), "the engine worker outlived an interrupted start-up"


@pytest.mark.slow  # a gateway process (it loads the tokenizer)
def test_the_gateway_says_where_it_listens_and_where_its_dashboard_is() -> None:
    port = free_port()
    argv = ["gateway", "--worker", "http://127.0.0.1:1", "--port", str(port)]
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *argv], stderr=subprocess.PIPE, text=True
    )
    try:
        assert gateway.stderr is not None
        seen = [gateway.stderr.readline()]
        while "listening" not in seen[-1]:
            seen.append(gateway.stderr.readline())
            assert seen[-1], f"the gateway ended: {seen}"
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
    base = f"http://127.0.0.1:{port}"
    assert f"listening on {base} (policy cache_aware, 1 worker)" in seen[-1]
    assert f"dashboard: {base}/dashboard" in seen[-1]
    assert any("does not answer (cannot connect" in line for line in seen)  # the worker, and why
