"""OpenAI-style errors: the gateway answers every failure as the engine worker does, with the same
``{"error": {...}}`` body, status mapping and middleware (``engine.server.errors``, torch-free)."""

from __future__ import annotations

from engine.server.errors import ApiError as GatewayError
from engine.server.errors import error_body, error_middleware

__all__ = ["GatewayError", "error_body", "error_middleware"]
