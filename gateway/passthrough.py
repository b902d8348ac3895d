"""Routes the gateway passes to workers as they are (``/v1/embeddings``): no prompt to hash, so no cache
key; the least loaded available worker takes the request, and one that answers 404 (it does not serve
the route) hands it to the next. A 404 from all of them is the gateway's 404: no worker serves it."""

from __future__ import annotations

import logging
import uuid

import orjson
from aiohttp import web

from cache.api.errors import ApiError
from gateway.dispatch import GATEWAY_ONLY_FIELDS
from gateway.handlers import read_request
from gateway.proxy import UpstreamCall, UpstreamFailed

log = logging.getLogger(__name__)


async def forward(request: web.Request, path: str) -> web.StreamResponse:
    """POST the client's body to ``path`` on the least loaded worker that serves it."""
    state, _, body = await read_request(request)
    body = {k: v for k, v in body.items() if k not in GATEWAY_ONLY_FIELDS}
    request_id = request.headers.get("X-Request-ID") or f"gw-{uuid.uuid4().hex[:16]}"
    call = UpstreamCall(url="", body=orjson.dumps(body), request_id=request_id, received=0.0)
    failures = []
    for worker in sorted(state.pool.available(), key=lambda w: w.load):
        try:
            with state.pool.dispatch(worker):
                relayed = await state.dispatcher.proxy.forward(request, _at(call, worker.url + path))
        except UpstreamFailed as exc:
            log.warning("%s on %s failed: %s", path, worker.worker_id, exc)
            failures.append(worker.worker_id)
            continue
        if relayed.status != 404:
            return relayed.response
    if failures:
        raise ApiError(502, f"{path} failed on every worker that might serve it ({', '.join(failures)})")
    raise ApiError(404, f"no worker serves {path}", code="unsupported_route")


def _at(call: UpstreamCall, url: str) -> UpstreamCall:
    return UpstreamCall(url=url, body=call.body, request_id=call.request_id, received=call.received)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await forward(request, "/v1/embeddings")
