"""KV cache events over ZMQ PUB, as vLLM publishes them, so any indexer can mirror this engine's cache.

Wire: multipart ``[topic, seq, payload]``; ``seq`` is an 8-byte big-endian counter from 0, ``payload``
a msgpack ``EventBatch`` in vLLM's array-like encoding (``cache.wire.events``). Block hashes are
``cache.wire.hashing``'s chained hashes rooted at ``namespace_seed(model_id)``, so they equal what the
gateway computes for the same token ids.

Tiers: with the hierarchical cache, ``medium`` says which tier changed, in SGLang's names (``GPU``,
``CPU_PINNED``, ``DISK``); without it, device events carry None, as vLLM's GPU prefix cache does.

Privacy: events carry what routing needs (hashes, parent, block size, medium). ``BlockStored``'s
``token_ids`` is empty unless the operator opts in (``include_token_ids``): the ids are every
tenant's prompt text. The socket binds this host only (loopback, ipc, inproc) unless it is
encrypted with CURVE (``curve_secret_key``; subscribers then need the server's public key, and with
``curve_clients_dir`` only the listed client keys may subscribe) or ``allow_remote`` says so.

Threading: the prefix cache calls the ``CacheListener`` methods on the engine thread; they only put
events on a queue. One sender thread owns the socket (ZMQ sockets are not thread-safe) and sends
everything that arrived together as one batch: a step's events are queued within microseconds of
each other, so a batch is in practice one engine step.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from cache.wire.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    encode_event_batch,
)
from cache.wire.hashing import block_hashes, namespace_seed
from engine.kv.prefix_cache import BlockHasher

log = logging.getLogger(__name__)

_STOP = object()


def make_block_hasher(model_id: str, page_size: int) -> BlockHasher:
    """The engine's page names: ``cache.wire.hashing`` chains with one block per KV page."""
    seed = namespace_seed(model_id)

    def hasher(parent: int | None, token_ids: Sequence[int]) -> list[int]:
        return block_hashes(token_ids, page_size, seed=seed, parent=parent)

    return hasher


def make_namespace_hash(model_id: str) -> Callable[[str], int]:
    """Chain roots of salted namespaces: a tenant's blocks hash as the gateway hashes them for it."""
    return lambda salt: namespace_seed(model_id, salt)


def check_endpoint(endpoint: str, *, encrypted: bool = False, allow_remote: bool = False) -> None:
    """Refuse (ValueError) a ZMQ address that other hosts can reach, unless the socket is encrypted
    (CURVE) or the operator allowed it: loopback addresses, ``ipc://`` and ``inproc://`` always pass;
    wildcards (``*``, ``0.0.0.0``, ``::``), interface names and other addresses need one of the two."""
    scheme, _, address = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return
    if scheme != "tcp" or ":" not in address:
        raise ValueError(f"KV event endpoint {endpoint!r}: expected tcp://HOST:PORT, ipc:// or inproc://")
    host = address.rsplit(":", 1)[0].removeprefix("[").removesuffix("]")
    if _is_loopback(host) or encrypted or allow_remote:
        return
    raise ValueError(
        f"KV event endpoint {endpoint!r} is reachable from other hosts; bind tcp://127.0.0.1:PORT, "
        "or encrypt it (--kv-events-curve-secret-key), or allow it (--kv-events-allow-remote)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name
        return False


def load_curve_secret_key(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from ``path``: the 40-character secret key ``zmq.curve_keypair()``
    returns, or a ZeroMQ secret certificate (``zmq.auth.create_certificates``' ``.key_secret``)."""
    try:
        text = Path(path).read_bytes().strip()
        secret = text if len(text) == 40 else zmq.auth.load_certificate(path)[1]
        if secret is None:
            raise ValueError("no secret key in it")
        return zmq.curve_public(secret), secret
    except (OSError, ValueError, zmq.ZMQError) as exc:
        raise ValueError(f"cannot read a CURVE secret key from {path}: {exc}") from None


class KVEventPublisher:
    """A ``CacheListener`` that publishes the prefix cache's changes. ``start`` binds and announces
    AllBlocksCleared (a fresh engine holds nothing); ``close`` flushes what is queued and unbinds.
    The constructor refuses (ValueError) an endpoint other hosts could reach, see ``check_endpoint``."""

    def __init__(
        self,
        endpoint: str,
        page_size: int,
        topic: str = "",
        batch_window_s: float = 0.002,
        hwm: int = 100_000,
        *,
        include_token_ids: bool = False,
        curve_secret_key: bytes | None = None,
        curve_clients_dir: str | Path | None = None,
        allow_remote: bool = False,
    ) -> None:
        """``curve_secret_key``: this server's Z85 secret key (``load_curve_secret_key``);
        ``curve_clients_dir``: certificates of the only clients allowed to subscribe (any client that
        knows the server's public key may, without it)."""
        check_endpoint(endpoint, encrypted=curve_secret_key is not None, allow_remote=allow_remote)
        if curve_clients_dir is not None and curve_secret_key is None:
            raise ValueError("KV event client keys need a server secret key (CURVE)")
        self.endpoint = endpoint
        self.page_size = page_size
        self.include_token_ids = include_token_ids
        self.curve_secret_key = curve_secret_key
        self.curve_public_key = zmq.curve_public(curve_secret_key).decode() if curve_secret_key else None
        self.curve_clients_dir = curve_clients_dir
        self.topic = topic.encode()
        self.batch_window_s = batch_window_s
        self.hwm = hwm
        self._queue: queue.SimpleQueue[KVEvent | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self.seq = 0  # next sequence number (owned by the sender thread)
        # First on the wire: a fresh engine holds nothing, except what it announces next (an engine
        # built after this, with a disk tier, announces the pages it restored before ``start``).
        self._queue.put(AllBlocksCleared())

    # -- CacheListener (engine thread) ------------------------------------------------------------
    def stored(
        self, parent_hash: int | None, hashes: list[int], token_ids: list[int], medium: str | None
    ) -> None:
        ids = list(token_ids) if self.include_token_ids else []  # prompt text: only if the operator opts in
        self._queue.put(BlockStored(list(hashes), parent_hash, ids, self.page_size, medium=medium))

    def removed(self, hashes: list[int], medium: str | None) -> None:
        self._queue.put(BlockRemoved(list(hashes), medium))

    def cleared(self) -> None:
        self._queue.put(AllBlocksCleared())

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()
        self._bound.wait(timeout=10)
        if self._error is not None:
            raise RuntimeError(f"cannot bind the KV event socket {self.endpoint}: {self._error}")

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    # -- sender thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.PUB)
        authenticator = None
        try:
            if self.curve_secret_key is not None:
                if self.curve_clients_dir is not None:  # ZAP: only these client keys get through
                    authenticator = ThreadAuthenticator(context)
                    authenticator.start()
                    authenticator.configure_curve(domain="*", location=str(self.curve_clients_dir))
                socket.curve_secretkey = self.curve_secret_key
                socket.curve_publickey = zmq.curve_public(self.curve_secret_key)
                socket.curve_server = True
            socket.setsockopt(zmq.SNDHWM, self.hwm)
            socket.setsockopt(zmq.LINGER, 1000)
            socket.bind(self.endpoint)
            self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves a wildcard port
        except zmq.ZMQError as exc:
            self._error = exc
            socket.close(linger=0)
            if authenticator is not None:
                authenticator.stop()
            context.term()
            self._bound.set()
            return
        self._bound.set()
        log.info("publishing KV events on %s", self.endpoint)
        try:
            stopping = False
            while not stopping:
                events, stopping = self._next_batch()
                if events:
                    batch = EventBatch(time.time(), events)
                    socket.send_multipart(
                        [self.topic, self.seq.to_bytes(8, "big"), encode_event_batch(batch)]
                    )
                    self.seq += 1
        finally:
            socket.close()
            if authenticator is not None:
                authenticator.stop()
            context.term()

    def _next_batch(self) -> tuple[list[KVEvent], bool]:
        """Block for one event, then take whatever follows within the batch window."""
        item = self._queue.get()
        if item is _STOP:
            return [], True
        events = [item]
        deadline = time.monotonic() + self.batch_window_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return events, False  # type: ignore[return-value]
            if item is _STOP:
                return events, True  # type: ignore[return-value]
            events.append(item)
