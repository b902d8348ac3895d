"""Helpers for tests against a real Redis: unique key prefixes, cleanup, a private redis-server, and a
private Redis Cluster."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode

from cache.index.redis_store import CLUSTER_SCHEME
from gateway.launcher import free_port, free_ports

SHARED_URL = "redis://127.0.0.1:6379/0"


def unique_prefix() -> str:
    return f"pgtest:{uuid.uuid4().hex[:10]}:"


def delete_prefix(url: str, prefix: str) -> None:
    client = sync_client(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def shared_redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(SHARED_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


class PrivateRedis:
    """A redis-server of our own (no persistence), so a test can kill and restart it safely."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def sync_client(url: str) -> redis.Redis | redis.RedisCluster:
    """A blocking client for a test's own checks: plain URLs, or ``redis+cluster://host:port[,...]``."""
    if not url.startswith(CLUSTER_SCHEME):
        return redis.Redis.from_url(url)
    seeds = [ClusterNode(*entry.rsplit(":", 1)) for entry in url[len(CLUSTER_SCHEME) :].split(",")]
    return redis.RedisCluster(startup_nodes=seeds)


@contextlib.contextmanager
def redis_url_for(backend: str, directory: Path) -> Iterator[str]:
    """A Redis to test the store against: "standalone" is the shared one at ``SHARED_URL``, "cluster" a
    ``LocalRedisCluster`` of three masters started for the caller (and torn down after). Skips when the
    one asked for is not there."""
    if backend == "standalone":
        if not shared_redis_available():
            pytest.skip("no Redis at 127.0.0.1:6379")
        yield SHARED_URL
        return
    if not LocalRedisCluster.available():
        pytest.skip("needs redis-server and redis-cli")
    cluster = LocalRedisCluster(directory)
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.stop()


CREATE_FLAGS = ("--cluster-replicas", "0", "--cluster-yes")
NODE_FLAGS = (
    *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
    *("--cluster-enabled", "yes", "--cluster-node-timeout", "1000"),  # ms before a silent node fails over
)


class LocalRedisCluster:
    """A Redis Cluster of our own: ``masters`` ``redis-server --cluster-enabled yes`` on loopback ports (their
    files under ``directory``), joined and given the slots by ``redis-cli --cluster create``. A short node
    timeout, so that ``add_replica`` + ``kill`` fail a master over in a few seconds."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.directory = directory
        self.masters = masters
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.bus_ports: dict[int, int] = {}  # node port -> its cluster bus port (CLUSTER MEET names both)

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None

    @property
    def url(self) -> str:
        return CLUSTER_SCHEME + ",".join(f"127.0.0.1:{port}" for port in self.procs)

    def start(self) -> None:
        ports = [self._spawn() for _ in range(self.masters)]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), *CREATE_FLAGS],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        wait_for(lambda: all(self._cluster_ok(p) for p in ports), "the cluster reports ok")

    def add_replica(self, master_port: int) -> int:
        """A new node that replicates ``master_port``; returns its port once it has synced."""
        port = self._spawn()
        node = redis.Redis(port=port)
        master = redis.Redis(port=master_port)
        master_id = master.execute_command("CLUSTER MYID").decode()
        node.execute_command("CLUSTER MEET", "127.0.0.1", master_port, self.bus_ports[master_port])

        def knows_master() -> bool:
            return any(n["node_id"] == master_id for n in node.cluster("nodes").values())

        wait_for(knows_master, "the new node knows the master")
        node.execute_command("CLUSTER REPLICATE", master_id)
        wait_for(lambda: node.info("replication").get("master_link_status") == "up", "the replica synced")
        return port

    def master_of(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot."""
        client = sync_client(self.url)
        try:
            return int(client.get_node_from_key(key).port)
        finally:
            client.close()

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)

    def _spawn(self) -> int:
        port, bus = free_ports(2)
        workdir = self.directory / str(port)
        workdir.mkdir()
        self.bus_ports[port] = bus
        self.procs[port] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--cluster-port",
                str(bus),
                "--dir",
                str(workdir),
                *NODE_FLAGS,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: pings(port), f"redis-server on {port}")
        return port

    @staticmethod
    def _cluster_ok(port: int) -> bool:
        try:
            return redis.Redis(port=port).cluster("info")["cluster_state"] == "ok"
        except redis.RedisError:
            return False


def pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # a bound on waiting, not a measured threshold
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"never reached: {what}")
        time.sleep(0.05)
