"""The KV transfer control channel (protocol version 1, ``docs/kv-transfer.md``): a peer engine asks
this one to stage blocks (``POST /kv_transfer/export``) and says when it is done with them
(``POST /kv_transfer/release``); ``GET /kv_transfer/info`` shows the layout and what is leased.

Present only when the server runs a transfer service (``--kv-transfer``). Anyone who can reach these
routes and knows a block's hash can read its KV: serve them on loopback or a private network only.
"""

from __future__ import annotations

from aiohttp import web

from cache.api.errors import ApiError, bad_request
from cache.api.fields import read_json
from engine.server.state import STATE
from engine.transfer.exporter import ExportRefused
from engine.transfer.protocol import ExportRequest, ProtocolError
from engine.transfer.service import TransferService


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/kv_transfer/export", export)
    r.add_post("/kv_transfer/release", release)
    r.add_get("/kv_transfer/info", info)


def _service(request: web.Request) -> TransferService:
    service = request.app[STATE].transfer
    if service is None:
        raise ApiError(404, "KV transfer is not enabled on this engine (--kv-transfer)", code="not_enabled")
    return service


async def export(request: web.Request) -> web.Response:
    service = _service(request)
    try:
        export_request = ExportRequest.from_json(await read_json(request))
    except ProtocolError as exc:
        raise bad_request(str(exc)) from None
    try:
        reply = await service.exporter.export(export_request)
    except ExportRefused as exc:
        raise ApiError(exc.status, str(exc), code=exc.code) from None
    return web.json_response(reply.to_json())


async def release(request: web.Request) -> web.Response:
    service = _service(request)
    lease_id = (await read_json(request)).get("lease_id")
    if not isinstance(lease_id, str):
        raise bad_request("'lease_id' must be a string", "lease_id")
    return web.json_response({"released": service.exporter.release(lease_id)})


async def info(request: web.Request) -> web.Response:
    return web.json_response(_service(request).info())
