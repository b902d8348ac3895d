"""Routes the gateway passes to workers as they are: ``/v1/embeddings`` and the tokenizer routes (vLLM's
``/v1/tokenize`` and ``/v1/detokenize``, SGLang's ``/tokenize`` and ``/detokenize``). No prompt to hash, so no
cache key: the least loaded available worker takes the request, and one that answers 404, 405 or 501
(it does not serve the route) hands it to the next. A body naming a ``model`` goes only to workers that
serve it (a tokenizer's answer is its model's): 404 ``model_not_found`` when no worker does. When none
serves the route, the gateway answers 404 ``unsupported_route``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from cache.api.errors import ApiError
from gateway.dispatch import GATEWAY_ONLY_FIELDS
from gateway.handlers import read_request
from gateway.proxy import UpstreamCall, UpstreamFailed
from gateway.workers import Worker

log = logging.getLogger(__name__)

NOT_SERVED = (404, 405, 501)  # what a server answers for a route it lacks
ROUTES = ("/v1/embeddings", "/v1/tokenize", "/v1/detokenize", "/tokenize", "/detokenize")


def add_routes(app: web.Application) -> None:
    for path in ROUTES:
        app.router.add_post(path, _handler(path))


def _handler(path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await forward(request, path)

    return handle


async def forward(request: web.Request, path: str) -> web.StreamResponse:
    """POST the client's body to ``path`` on the least loaded worker that serves it."""
    state, _, body = await read_request(request)
    body = {k: v for k, v in body.items() if k not in GATEWAY_ONLY_FIELDS}
    request_id = request.headers.get("X-Request-ID") or f"gw-{uuid.uuid4().hex[:16]}"
    call = UpstreamCall(url="", body=orjson.dumps(body), request_id=request_id, received=0.0)
    failures = []
    for worker in _candidates(state.pool.available(), body.get("model"), state.served_models()):
        try:
            with state.pool.dispatch(worker):
                relayed = await state.dispatcher.proxy.forward(request, _at(call, worker.url + path))
        except UpstreamFailed as exc:
            log.warning("%s on %s failed: %s", path, worker.worker_id, exc)
            failures.append(worker.worker_id)
            continue
        if relayed.status not in NOT_SERVED:
            return relayed.response
    if failures:
        raise ApiError(502, f"{path} failed on every worker that might serve it ({', '.join(failures)})")
    raise ApiError(404, f"no worker serves {path}", code="unsupported_route")


def _candidates(workers: list[Worker], model: object, served: list[str]) -> list[Worker]:
    """Least loaded first; only those serving ``model`` when it is named (and workers say what they serve)."""
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model is not None and served:
        if model not in served:
            raise ApiError(
                404,
                f"the model '{model[:100]}' does not exist; served: {', '.join(served)}",
                param="model",
                code="model_not_found",
            )
        workers = [w for w in workers if w.model_id == model]
    return sorted(workers, key=lambda w: w.load)


def _at(call: UpstreamCall, url: str) -> UpstreamCall:
    return UpstreamCall(url=url, body=call.body, request_id=call.request_id, received=call.received)
