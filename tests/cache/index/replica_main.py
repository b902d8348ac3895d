"""A gateway replica in its own process, driven over stdin/stdout with JSON lines (for the Redis tests).

Commands: {"cmd": "append", "ops": [hex of cache.index.ops encoding, ...]} | {"cmd": "caught_up"} |
{"cmd": "match", "queries": [[hash, ...], ...]} | {"cmd": "snapshot"} | {"cmd": "status"} | {"cmd": "exit"}.
Every reply is one JSON line; an exception escaping anywhere is reported as {"error": ...} and fails the test.
"""

from __future__ import annotations

import asyncio
import json
import sys

from cache.index.ops import decode_op
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig


async def main(url: str, prefix: str) -> None:
    store = RedisIndexStore(
        RedisStoreConfig(url=url, key_prefix=prefix, op_timeout_s=0.3, snapshot_every_ops=10**9)
    )
    await store.start()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        request = json.loads(line)
        cmd = request["cmd"]
        reply: object
        if cmd == "append":
            await store.append_many([decode_op(bytes.fromhex(h)) for h in request["ops"]])
            reply = {"ok": True}
        elif cmd == "caught_up":
            reply = {"ok": await store.caught_up()}
        elif cmd == "match":
            results = [store.match(q) for q in request["queries"]]
            reply = {
                "ok": [{w: [m.blocks, m.device_blocks, m.host_blocks] for w, m in r.items()} for r in results]
            }
        elif cmd == "snapshot":
            reply = {"ok": await store.write_snapshot()}
        elif cmd == "status":
            reply = {"ok": store.status, "task_alive": store._task is not None and not store._task.done()}
        elif cmd == "exit":
            await store.close()
            print(json.dumps({"ok": True}), flush=True)
            return
        else:
            reply = {"error": f"unknown command {cmd}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    except Exception as exc:  # reported, so the test fails with the cause
        print(json.dumps({"error": repr(exc)}), flush=True)
        raise
