"""The real engine worker on loopback for the engine's security tests (``tests.engine.server``'s fixture)."""

from tests.engine.server.conftest import engine_server

__all__ = ["engine_server"]
