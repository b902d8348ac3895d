from cache.index.ops import StoredOp, WorkerGoneOp
from cache.index.radix_index import MatchResult
from cache.index.store import LocalIndexStore


async def test_local_store_has_the_same_behaviour() -> None:
    store = LocalIndexStore()
    await store.start()
    await store.append(StoredOp("w", None, [1, 2]))
    assert store.match([1, 2]) == {"w": MatchResult(2, 2, 0)} and store.status == "healthy"
    await store.append(WorkerGoneOp("w"))
    assert store.match([1, 2]) == {}
    await store.close()
