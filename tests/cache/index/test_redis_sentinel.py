"""Redis Sentinel: the store follows the master the sentinels name, goes degraded on a failover, converges.

Real processes (``redis-server``, and ``redis-server --sentinel``, which is what Debian's redis-sentinel
package runs): a master, its replica, one sentinel with a quorum of 1.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from cache.index.ops import StoredOp
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig, redis_client
from gateway.launcher import free_ports

pytestmark = [
    pytest.mark.slow,  # starts redis-server processes
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]
SERVICE = "prefixgate-test"


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # a bound on waiting, not a measured threshold
    while not predicate():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.1)


def pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[dict]:
    master, replica, sentinel = free_ports(3)
    # --dir: a replica writes the master's RDB to disk on sync; keep it out of the working tree
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    procs = {
        "master": subprocess.Popen(["redis-server", "--port", str(master), *common]),
        "replica": subprocess.Popen(
            ["redis-server", "--port", str(replica), "--replicaof", "127.0.0.1", str(master), *common]
        ),
    }
    conf = tmp_path / "sentinel.conf"  # the sentinel rewrites its config: a file of its own
    conf.write_text(
        f"port {sentinel}\nbind 127.0.0.1\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master} 1\n"
        f"sentinel down-after-milliseconds {SERVICE} 500\n"
        f"sentinel failover-timeout {SERVICE} 2000\n"
    )
    procs["sentinel"] = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        for port in (master, replica, sentinel):
            wait_for(lambda port=port: pings(port), f"redis on {port}")
        yield {"ports": (master, replica, sentinel), "procs": procs}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def held(store: RedisIndexStore) -> int:
    match = store.match([1, 2, 3]).get("w")
    return match.blocks if match else 0


def knows_replica(sentinel: int, replica: int) -> bool:
    replicas = redis.Redis(port=sentinel, decode_responses=True).sentinel_slaves(SERVICE)
    return any(r["port"] == replica and not r["is_sdown"] for r in replicas)


def master_port(sentinel: int) -> int:
    return int(redis.Redis(port=sentinel).sentinel_get_master_addr_by_name(SERVICE)[1])


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, f"never reached: {what}"
        await asyncio.sleep(0.1)


def test_sentinel_urls_are_parsed() -> None:
    client = redis_client("redis+sentinel://:pw@10.0.0.1:26380,10.0.0.2/mymaster/2", socket_timeout=0.5)
    pool = client.connection_pool
    assert pool.service_name == "mymaster"
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in pool.sentinel_manager.sentinels] == [("10.0.0.1", 26380), ("10.0.0.2", 26379)]  # fmt: skip
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (2, "pw")
    with pytest.raises(ValueError, match="sentinel"):
        redis_client("redis+sentinel://10.0.0.1:26379")


async def test_a_failover_degrades_the_store_which_then_converges(sentinel_setup: dict) -> None:
    _, replica, sentinel = sentinel_setup["ports"]
    url = f"redis+sentinel://127.0.0.1:{sentinel}/{SERVICE}"
    config = RedisStoreConfig(url=url, key_prefix=f"test-sentinel-{time.time_ns()}:")
    store = RedisIndexStore(config)
    await store.start()
    try:
        await until(lambda: store.status == "healthy", "the store synced through the sentinel")
        await store.append(StoredOp("w", None, [1, 2]))
        await until(lambda: redis.Redis(port=replica).dbsize() > 0, "the op replicated")

        # the sentinel learns of replicas from the master's INFO (every 10 s): no failover before it has
        await until(lambda: knows_replica(sentinel, replica), "the sentinel knows the replica")
        sentinel_setup["procs"]["master"].kill()
        await until(lambda: store.status == "degraded", "degraded while the master is gone")
        await store.append(StoredOp("w", 2, [3]))  # still serving from its local index
        assert held(store) == 3

        await until(lambda: master_port(sentinel) == replica, "the sentinel promoted the replica")
        await until(lambda: store.status == "healthy", "the store converged on the new master")
        other = RedisIndexStore(config)  # a replica starting now reads the log from the new master
        await other.start()
        try:
            await until(lambda: held(other) == 3, "a new replica reads the new master's log")
        finally:
            await other.close()
    finally:
        await store.close()
