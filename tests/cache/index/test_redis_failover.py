"""Redis that survives a node: the store follows the master Redis Sentinel names, or a Redis Cluster's slot
map; when the master dies it goes degraded, keeps serving from its own index, and converges on the
promoted replica.

Real processes. Sentinel: a master, its replica and one sentinel (``redis-server --sentinel``, which is what
Debian's redis-sentinel package runs) with a quorum of 1. Cluster: three masters (``redis-cli --cluster
create``) and a replica of the master that holds the index's slot, with a short node timeout.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from cache.index.ops import StoredOp
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig, index_key_prefix, redis_client
from gateway.launcher import free_ports
from tests.cache.index.redis_util import LocalRedisCluster, pings, unique_prefix, wait_for

SERVICE = "prefixgate-test"


def test_sentinel_urls_are_parsed() -> None:
    client = redis_client("redis+sentinel://:pw@10.0.0.1:26380,10.0.0.2/mymaster/2", socket_timeout=0.5)
    pool = client.connection_pool
    assert pool.service_name == "mymaster"
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in pool.sentinel_manager.sentinels] == [("10.0.0.1", 26380), ("10.0.0.2", 26379)]  # fmt: skip
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (2, "pw")
    with pytest.raises(ValueError, match="sentinel"):
        redis_client("redis+sentinel://10.0.0.1:26379")


def test_cluster_urls_are_parsed() -> None:
    client = redis_client("redis+cluster://ops:pw@10.0.0.1:7000,[::1]:7001,10.0.0.2", socket_timeout=0.5)
    assert isinstance(client, RedisCluster)
    seeds = client.nodes_manager.startup_nodes.values()
    assert [(n.host, n.port) for n in seeds] == [("10.0.0.1", 7000), ("::1", 7001), ("10.0.0.2", 6379)]
    kwargs = client.nodes_manager.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["socket_timeout"]) == ("ops", "pw", 0.5)
    for bad in ("redis+cluster://", "redis+cluster://10.0.0.1:7000/2"):  # no node; a cluster has no db 2
        with pytest.raises(ValueError, match="cluster"):
            redis_client(bad)


@dataclass
class Failover:
    """One Redis deployment with a master and a replica, as the failover test drives it."""

    url: str
    prefix: str
    replicated: Callable[[], bool]  # the replica holds the store's data
    ready: Callable[[], bool]  # whatever promotes the replica knows it
    kill_master: Callable[[], None]
    promoted: Callable[[], bool]  # the replica is the master now


def _sentinel(tmp_path: Path) -> Iterator[Failover]:
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

    def knows_replica() -> bool:  # the sentinel learns of replicas from the master's INFO (every 10 s)
        replicas = redis.Redis(port=sentinel, decode_responses=True).sentinel_slaves(SERVICE)
        return any(r["port"] == replica and not r["is_sdown"] for r in replicas)

    def promoted() -> bool:
        return int(redis.Redis(port=sentinel).sentinel_get_master_addr_by_name(SERVICE)[1]) == replica

    try:
        for port in (master, replica, sentinel):
            wait_for(lambda port=port: pings(port), f"redis on {port}")
        yield Failover(
            url=f"redis+sentinel://127.0.0.1:{sentinel}/{SERVICE}",
            prefix=unique_prefix(),
            replicated=lambda: redis.Redis(port=replica).dbsize() > 0,
            ready=knows_replica,
            kill_master=procs["master"].kill,
            promoted=promoted,
        )
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def _cluster(tmp_path: Path) -> Iterator[Failover]:
    cluster, prefix = LocalRedisCluster(tmp_path), unique_prefix()
    try:
        cluster.start()
        master = cluster.master_of(index_key_prefix(prefix) + "log")
        replica = cluster.add_replica(master)
        yield Failover(
            url=cluster.url,
            prefix=prefix,
            replicated=lambda: redis.Redis(port=replica).dbsize() > 0,
            ready=lambda: True,  # every master watches every node: the replica is known once it synced
            kill_master=lambda: cluster.kill(master),
            promoted=lambda: redis.Redis(port=replica).info("replication")["role"] == "master",
        )
    finally:
        cluster.stop()


@pytest.fixture(params=["sentinel", "cluster"])
def failover(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Failover]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    if request.param == "cluster" and not LocalRedisCluster.available():
        pytest.skip("needs redis-cli")
    yield from {"sentinel": _sentinel, "cluster": _cluster}[request.param](tmp_path)


def held(store: RedisIndexStore) -> int:
    match = store.match([1, 2, 3]).get("w")
    return match.blocks if match else 0


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # a bound on waiting, not a measured threshold
    while not predicate():
        assert time.monotonic() < deadline, f"never reached: {what}"
        await asyncio.sleep(0.1)


@pytest.mark.slow  # starts redis-server processes
async def test_a_failover_degrades_the_store_which_then_converges(failover: Failover) -> None:
    config = RedisStoreConfig(url=failover.url, key_prefix=failover.prefix)
    store = RedisIndexStore(config)
    await store.start()
    try:
        await until(lambda: store.status == "healthy", "the store synced")
        await store.append(StoredOp("w", None, [1, 2]))
        await until(failover.replicated, "the op replicated")

        await until(failover.ready, "the replica can be promoted")
        failover.kill_master()
        await until(lambda: store.status == "degraded", "degraded while the master is gone")
        await store.append(StoredOp("w", 2, [3]))  # still serving from its local index
        assert held(store) == 3

        await until(failover.promoted, "the replica was promoted")
        await until(lambda: store.status == "healthy", "the store converged on the new master")
        other = RedisIndexStore(config)  # a replica starting now reads the log from the new master
        await other.start()
        try:
            await until(lambda: held(other) == 3, "a new replica reads the new master's log")
        finally:
            await other.close()
    finally:
        await store.close()


@pytest.mark.slow  # starts redis-server processes
async def test_the_store_survives_the_loss_of_the_node_its_cluster_client_asks_for_key_slots(
    tmp_path: Path,
) -> None:
    """redis-py's cluster client asks one node (``commands_parser.node``) which slot an XREAD goes to,
    outside its own error handling: when that node died, every XREAD failed and the client never
    re-learned the topology, so the store stayed degraded for good. Kill exactly that node."""
    if not LocalRedisCluster.available():
        pytest.skip("needs redis-server and redis-cli")
    cluster = LocalRedisCluster(tmp_path)
    try:
        cluster.start()
        config = RedisStoreConfig(url=cluster.url, key_prefix=unique_prefix())
        store = RedisIndexStore(config)
        await store.start()
        try:
            await until(lambda: store.status == "healthy", "the store synced")
            await store.append(StoredOp("w", None, [1, 2, 3]))
            parser = store._tail.commands_parser
            await until(lambda: getattr(parser, "node", None) is not None, "the tail client initialised")
            asked = int(parser.node.port)
            replica = cluster.add_replica(asked)  # so that the cluster can do without it
            cluster.kill(asked)
            await until(lambda: store.status == "degraded", "degraded while that node is gone")
            await until(lambda: redis.Redis(port=replica).info("replication")["role"] == "master", "promoted")
            await until(lambda: store.status == "healthy", "the store converged")
            other = RedisIndexStore(config)
            await other.start()
            try:
                await until(lambda: held(other) == 3, "a new replica reads the log")
            finally:
                await other.close()
        finally:
            await store.close()
    finally:
        cluster.stop()
