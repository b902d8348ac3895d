"""Several gateway replicas, each in its own process, sharing the index through a real Redis (the shared
one, and a Redis Cluster of the test's own)."""

from __future__ import annotations

import json
import random
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.index.ops import ApproxOp, ClearedOp, IndexOp, RemovedOp, StoredOp, encode_op
from cache.index.redis_store import index_key_prefix
from cache.wire.tiers import Tier
from tests.cache.index.index_model import BruteForceIndex
from tests.cache.index.redis_util import (
    PrivateRedis,
    delete_prefix,
    redis_url_for,
    sync_client,
    unique_prefix,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
CHAINS = 6
QUERIES = [[c * 1000 + i for i in range(24)] for c in range(CHAINS)] + [[c * 1000 for c in range(CHAINS)]]


class Replica:
    def __init__(self, url: str, prefix: str) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cache.index.replica_main", url, prefix],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def call(self, cmd: str, timeout: float = 20.0, **args: object) -> object:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"replica did not answer {cmd!r}; stderr:\n{self.errors()}"
        reply = json.loads(self.proc.stdout.readline() or '{"error": "replica exited"}')
        assert "error" not in reply, f"{reply['error']}; stderr:\n{self.errors()}"
        return reply["ok"]

    def append(self, ops: list[IndexOp]) -> None:
        self.call("append", ops=[encode_op(op).hex() for op in ops])

    def matches(self) -> object:
        return self.call("match", queries=QUERIES)

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.call("exit")
            self.proc.wait(timeout=10)
        assert "Traceback" not in self.errors(), self.errors()


def random_ops(rng: random.Random, workers: list[str], n: int) -> list[IndexOp]:
    """Plausible KV events for the workers this replica owns, plus approximate inserts for shared worker x."""
    ops: list[IndexOp] = []
    for _ in range(n):
        chain, start = rng.randrange(CHAINS), rng.choice([0, 0, rng.randrange(20)])
        hashes = [chain * 1000 + i for i in range(start, start + rng.randint(1, 12))]
        parent = hashes[0] - 1 if start else None
        worker, roll = rng.choice(workers), rng.random()
        if roll < 0.5:
            ops.append(StoredOp(worker, parent, hashes, rng.choice([Tier.DEVICE, Tier.DEVICE, Tier.HOST])))
        elif roll < 0.75:
            ops.append(RemovedOp(worker, hashes, rng.choice(list(Tier))))
        elif roll < 0.8:
            ops.append(ClearedOp(worker))
        else:
            ops.append(ApproxOp("x", parent, hashes, 4e9))  # far future: no expiry during the test
    return ops


def expected(ops_by_source: list[list[IndexOp]]) -> object:
    """Ops from different replicas touch disjoint workers (or commute), so any source order gives this."""
    model = BruteForceIndex()
    for ops in ops_by_source:
        for op in ops:
            if isinstance(op, StoredOp):
                model.stored(op.worker, op.parent_hash, op.hashes, op.tier)
            elif isinstance(op, RemovedOp):
                model.removed(op.worker, op.hashes, op.tier)
            elif isinstance(op, ClearedOp):
                model.cleared(op.worker)
            elif isinstance(op, ApproxOp):
                model.insert_approximate(op.worker, op.parent_hash, op.hashes, op.expires_at)
    results = [
        {w: [m.blocks, m.device_blocks, m.host_blocks] for w, m in model.match(q).items()} for q in QUERIES
    ]
    assert sum(map(len, results)) >= 3, "test data too sparse to show anything"
    return results


def wait_caught_up(*replicas: Replica, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all([r.call("caught_up") for r in replicas]):
        assert time.monotonic() < deadline, "replicas did not catch up"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_url_for(request.param, tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url


@pytest.fixture
def shared_prefix(url: str) -> Iterator[str]:
    prefix = unique_prefix()
    yield prefix
    delete_prefix(url, prefix)


@pytest.mark.parametrize("seed", [1, 2])
def test_replicas_converge_and_late_replica_catches_up_from_snapshot(
    url: str, shared_prefix: str, seed: int
) -> None:
    rng = random.Random(seed)
    a, b = Replica(url, shared_prefix), Replica(url, shared_prefix)
    replicas = [a, b]
    ops_a: list[IndexOp] = []
    ops_b: list[IndexOp] = []
    try:
        for _ in range(4):  # interleaved rounds from both replicas
            batch_a, batch_b = random_ops(rng, ["w0", "w1"], 15), random_ops(rng, ["w2", "w3"], 15)
            a.append(batch_a)
            b.append(batch_b)
            ops_a += batch_a
            ops_b += batch_b
        wait_caught_up(a, b)
        assert a.matches() == b.matches() == expected([ops_a, ops_b])

        # Two snapshots: the second trims the log to the first, so replaying the log alone is not enough.
        assert a.call("snapshot")
        more = random_ops(rng, ["w2", "w3"], 20)
        b.append(more)
        ops_b += more
        wait_caught_up(a, b)
        assert b.call("snapshot")
        tail = random_ops(rng, ["w0", "w1"], 20)
        a.append(tail)
        ops_a += tail
        log_len = sync_client(url).xlen(index_key_prefix(shared_prefix) + "log")
        assert log_len < len(ops_a) + len(ops_b)

        c = Replica(url, shared_prefix)
        replicas.append(c)
        wait_caught_up(a, b, c)
        assert c.matches() == a.matches() == b.matches() == expected([ops_a, ops_b])
    finally:
        for replica in replicas:
            replica.close()


@pytest.mark.skipif(not PrivateRedis.available(), reason="redis-server not installed")
def test_redis_restart_mid_run_degrades_then_converges() -> None:
    server = PrivateRedis()
    server.start()
    rng = random.Random(7)
    a, b = Replica(server.url, "pg:"), Replica(server.url, "pg:")
    ops_a, ops_b = random_ops(rng, ["w0", "w1"], 30), random_ops(rng, ["w2", "w3"], 30)
    try:
        a.append(ops_a)
        b.append(ops_b)
        wait_caught_up(a, b)

        server.stop()  # Redis dies, losing everything (no persistence)
        down_a, down_b = random_ops(rng, ["w0", "w1"], 20), random_ops(rng, ["w2", "w3"], 20)
        a.append(down_a)
        b.append(down_b)
        ops_a += down_a
        ops_b += down_b
        time.sleep(0.5)
        assert a.call("status") == b.call("status") == "degraded"
        # Routing goes on from each local index: everything seen before, plus its own writes since.
        assert a.matches() == expected([ops_a, ops_b[: -len(down_b)]])
        assert b.matches() == expected([ops_a[: -len(down_a)], ops_b])

        server.start()  # same port, empty
        after = random_ops(rng, ["w2", "w3"], 10)
        b.append(after)
        ops_b += after
        wait_caught_up(a, b)
        assert a.call("status") == b.call("status") == "healthy"
        assert a.matches() == b.matches() == expected([ops_a, ops_b])
    finally:
        try:
            a.close()
            b.close()
        finally:
            server.stop()
