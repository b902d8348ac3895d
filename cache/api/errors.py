"""Errors as part of the interface (engine worker and gateway alike; torch-free): every failure leaves as an OpenAI-style JSON body.

``{"error": {"message", "type", "param", "code"}}`` with the status that says whose fault it was:
4xx for the request, 5xx for the engine. The middleware turns ``ApiError``, aiohttp's own HTTP
errors (unknown route, wrong method) and anything unexpected into that shape, so no handler has to.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """A request that cannot be served, with the status and OpenAI error fields to report."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    error_type = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


def make_error_middleware(logger: logging.Logger) -> Any:
    """The middleware, logging under ``logger``: each server's own name (``gateway.app``,
    ``engine.server.app``), so an operator reading one process's log knows which side failed."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.status >= 500:
                logger.warning("%s %s failed: %s", request.method, request.path, exc.message)
            return error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = f"{request.method} {request.path}: {exc.reason}"
            return error_response(ApiError(exc.status, message, code=exc.reason.lower().replace(" ", "_")))
        except Exception:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(ApiError(500, "internal server error (see the server log)"))

    return error_middleware


error_middleware = make_error_middleware(log)
