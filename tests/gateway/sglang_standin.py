"""A STAND-IN for an SGLang server, for tests only: real SGLang servers cannot run on these machines.

It is not SGLang and runs no model. It takes the subset of ``python -m sglang.launch_server``'s flags that
``prefixgate serve --engine sglang`` passes (so the supervisor can start it with the real command line's
arguments), serves the HTTP endpoints the gateway uses (``/health``, ``/get_server_info`` with SGLang's
field names, ``/get_load``, ``/v1/models``, ``/v1/chat/completions``), and keeps a prefix cache of
``--page-size`` pages named as SGLang names them (``EngineRadix``: chained SHA-256 truncated to int64),
whose ``BlockStored`` events it publishes through SGLang 0.5.2's own ``EventPublisherFactory`` /
``ZmqEventPublisher`` with the ``--kv-events-config`` it was given, one publisher per DP rank.

Prompts are tokenized with the bundled model's tokenizer by ``cache.api.requests.parse_request`` (the
gateway's own parser: a real SGLang tokenizes with its chat template; here both sides agree by
construction). Every chat caches its whole prompt on DP rank ``requests % dp_size`` and answers "ok".
``GET /standin/cache`` reports the pages held and the requests served.

With ``--disaggregation-mode prefill|decode`` it plays one side of SGLang's PD mode as the router sees it:
both sides require ``bootstrap_host``, ``bootstrap_port`` and ``bootstrap_room``; the prefill side runs a
bootstrap server on ``--disaggregation-bootstrap-port`` and, once it has "prefilled" a room, tells it there
(``GET /room/{room}``: the prompt's token count); the decode side waits for its room there (as SGLang's
decode side waits for the KV) and answers with that count as content, so a test sees which prefill fed it.

Run as ``python -m tests.gateway.sglang_standin --model-path M --port P --kv-events-config JSON ...``
from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import sglang.srt.disaggregation.kv_events as sglang_events
from aiohttp import web

from cache.api.requests import ServingLimits, parse_request
from cache.prompt.model_files import default_model_path
from cache.prompt.tokenizer import Tokenizer
from tests.cache.index.test_rekey import EngineRadix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--kv-events-config", default=None)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--enable-dp-attention", action="store_true")
    p.add_argument("--enable-hierarchical-cache", action="store_true")  # accepted, as passed through
    p.add_argument("--hicache-ratio", type=float, default=2.0)
    p.add_argument("--disaggregation-mode", choices=("null", "prefill", "decode"), default="null")
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
    return p.parse_known_args(argv)[0]


class StandIn:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        ranks = args.dp_size if args.enable_dp_attention else 1
        self.caches = [EngineRadix(args.page_size) for _ in range(ranks)]
        self.publishers = [
            sglang_events.EventPublisherFactory.create(args.kv_events_config, rank) for rank in range(ranks)
        ]
        self.tokenizer = Tokenizer.from_checkpoint_path(default_model_path())
        self.limits = ServingLimits(vocab_size=self.tokenizer.vocab_size)
        self.requests = 0
        self.rooms: dict[int, int] = {}  # prefill side: bootstrap room -> prompt tokens prefilled
        self.rooms_seen: list[dict] = []  # both sides: the bootstrap fields of each request

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/get_load", self.load)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/flush_cache", self.flush)
        app.router.add_get("/standin/cache", self.cache)
        if self.args.disaggregation_mode == "prefill":
            app.on_startup.append(self.start_bootstrap)
        app.on_cleanup.append(self.close)
        return app

    async def health(self, _: web.Request) -> web.Response:
        return web.Response()

    async def server_info(self, _: web.Request) -> web.Response:
        a = self.args
        return web.json_response(
            {  # SGLang's ServerArgs field names (it sends all of them, and its scheduler info)
                "model_path": a.model_path,
                "served_model_name": a.model_path,
                "page_size": a.page_size,
                "dp_size": a.dp_size,
                "enable_dp_attention": a.enable_dp_attention,
                "kv_events_config": a.kv_events_config,
                "disaggregation_mode": a.disaggregation_mode,
                "disaggregation_bootstrap_port": a.disaggregation_bootstrap_port,
                "context_length": 8192,
                "version": "stand-in",
            }
        )

    async def load(self, _: web.Request) -> web.Response:
        return web.json_response([{"num_reqs": 0, "num_waiting_reqs": 0}])

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.args.model_path, "object": "model"}]}
        )

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt_ids = parse_request("chat", body, self.tokenizer, self.limits).prompt_ids
        content = "ok"
        if self.args.disaggregation_mode != "null":
            fields = {k: body.get(k) for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")}
            if not isinstance(fields["bootstrap_room"], int):
                return web.json_response({"error": {"message": "bootstrap_room is required"}}, status=400)
            self.rooms_seen.append(fields)
            if self.args.disaggregation_mode == "prefill":
                self.rooms[fields["bootstrap_room"]] = len(prompt_ids)
            else:
                content = await self.wait_for_room(fields)
        rank = self.requests % len(self.caches)
        self.requests += 1
        events = self.caches[rank].insert(list(prompt_ids))
        self.publishers[rank].publish(sglang_events.KVEventBatch(ts=time.time(), events=events))
        reply = {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.args.model_path,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": 1,
                "total_tokens": len(prompt_ids) + 1,
            },
        }
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {**reply, "object": "chat.completion.chunk"}
            chunk["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": "stop"}]
            await response.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
            await response.write_eof()
            return response
        return web.json_response(reply)

    async def flush(self, _: web.Request) -> web.Response:
        """SGLang's ``/flush_cache``: the radix cache is reset, which publishes ``AllBlocksCleared``."""
        for rank, publisher in enumerate(self.publishers):
            self.caches[rank] = EngineRadix(self.args.page_size)
            events = [sglang_events.AllBlocksCleared()]
            publisher.publish(sglang_events.KVEventBatch(ts=time.time(), events=events))
        return web.Response(text="Cache flushed.")

    async def cache(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "pages": [len(c.pages) for c in self.caches],
                "requests": self.requests,
                "rooms": self.rooms_seen,
            }
        )

    async def start_bootstrap(self, _: web.Application) -> None:
        bootstrap = web.Application()
        bootstrap.router.add_get("/room/{room}", self.room)
        self.bootstrap_runner = web.AppRunner(bootstrap)
        await self.bootstrap_runner.setup()
        site = web.TCPSite(self.bootstrap_runner, self.args.host, self.args.disaggregation_bootstrap_port)
        await site.start()

    async def room(self, request: web.Request) -> web.Response:
        room = int(request.match_info["room"])
        for _ in range(200):  # the prefill leg may arrive after the decode leg asks
            if room in self.rooms:
                return web.json_response({"prompt_tokens": self.rooms[room]})
            await asyncio.sleep(0.05)
        return web.json_response({"error": "no such room"}, status=404)

    async def wait_for_room(self, fields: dict) -> str:
        url = f"http://{fields['bootstrap_host']}:{fields['bootstrap_port']}/room/{fields['bootstrap_room']}"
        async with aiohttp.ClientSession() as session, session.get(url) as r:
            if r.status != 200:
                return "no kv"
            return f"prefilled {(await r.json())['prompt_tokens']}"

    async def close(self, _: web.Application) -> None:
        for publisher in self.publishers:
            publisher.shutdown()


def main() -> None:
    args = parse_args()
    web.run_app(StandIn(args).app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
