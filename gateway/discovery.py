"""Workers found by DNS: ``--worker-dns HOST:PORT`` (a Kubernetes headless service names every ready pod).

Each resolution's addresses become workers ``http://ADDRESS:PORT``. ``DnsWorkers.sync`` compares them with
the previous resolution: new addresses are attached (probed, then routed to once healthy), addresses that
are gone are detached (no new requests; requests in flight finish; their index entries are dropped on
every replica). A failed resolution changes nothing: a DNS outage must not empty the pool.

Invariant: only workers this object attached are ever detached by it; static ``--worker`` URLs and
workers attached through the admin API are left alone, even when an address resolves to one of them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Collection

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[set[str]]]


def parse_name(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ValueError otherwise."""
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--worker-dns {spec!r}: expected HOST:PORT, e.g. engine.default.svc:30000")
    return host.strip("[]"), int(port)


async def resolve_addresses(host: str, port: int) -> set[str]:
    """The addresses ``host`` resolves to (IPv4 and IPv6, TCP); ``socket.gaierror`` if none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return {info[4][0] for info in infos}


def worker_url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


class DnsWorkers:
    def __init__(
        self,
        specs: tuple[str, ...],
        attach: Callable[[str], Awaitable[object]],
        detach: Callable[[str], Awaitable[object]],
        resolve: Resolver = resolve_addresses,
        static: Collection[str] = (),
    ) -> None:
        """``static``: worker URLs attached otherwise (``--worker``), never attached or detached here."""
        self.names = [parse_name(spec) for spec in specs]
        self._attach, self._detach = attach, detach
        self.resolve = resolve
        self.static = frozenset(url.rstrip("/") for url in static)
        self._found: dict[tuple[str, int], set[str]] = {name: set() for name in self.names}

    @property
    def urls(self) -> set[str]:
        return set().union(*self._found.values())

    async def sync(self) -> None:
        """Resolve every name once; attach what appeared, detach what disappeared."""
        for name in self.names:
            host, port = name
            try:
                addresses = await self.resolve(host, port)
            except OSError as exc:
                kept = len(self._found[name])
                log.warning(
                    "worker DNS %s:%d did not resolve (%s); keeping its %d workers", host, port, exc, kept
                )
                continue
            urls = {worker_url(a, port) for a in addresses} - self.static
            before = self._found[name]
            others = set().union(*(v for k, v in self._found.items() if k != name))
            for url in sorted(urls - before - others):
                log.info("worker DNS %s: %s appeared; attaching it", host, url)
                await self._attach(url)
            for url in sorted(before - urls - others):
                log.info("worker DNS %s: %s is gone; draining it and dropping its index entries", host, url)
                await self._detach(url)
            self._found[name] = urls
