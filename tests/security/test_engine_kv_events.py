"""The KV event socket leaks nothing: no prompt token ids unless the operator opts in, loopback unless
encrypted (ZMQ CURVE) or allowed, and with CURVE only subscribers with the right keys read events.

Real ZMQ PUB/SUB sockets on loopback; the publisher is driven directly (no model needed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from cache.wire.events import BlockStored, decode_event_batch
from engine.server.kv_events import KVEventPublisher, check_endpoint, load_curve_secret_key

PAGE = 4
TOKENS = list(range(100, 100 + 2 * PAGE))


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def publisher(**options) -> KVEventPublisher:
    pub = KVEventPublisher("tcp://127.0.0.1:*", PAGE, batch_window_s=0.0, **options)
    pub.start()
    return pub


def subscriber(
    context: zmq.Context, pub: KVEventPublisher, keys: tuple[bytes, bytes] | None = None
) -> zmq.Socket:
    """A SUB socket; with ``keys`` (public, secret) it speaks CURVE to the publisher's public key."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sub.curve_publickey, sub.curve_secretkey = keys
        assert pub.curve_public_key is not None
        sub.curve_serverkey = pub.curve_public_key.encode()
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    return sub


def first_block_stored(pub: KVEventPublisher, sub: zmq.Socket, attempts: int = 40) -> BlockStored | None:
    """Publish until the subscriber gets a BlockStored (a ZMQ subscription takes a moment to join);
    None if it never does (``attempts`` polls of 50 ms)."""
    for _ in range(attempts):
        pub.stored(None, [11, 12], TOKENS, None)
        while sub.poll(50):
            _, _, payload = sub.recv_multipart()
            stored = [e for e in decode_event_batch(payload).events if isinstance(e, BlockStored)]
            if stored:
                return stored[0]
    return None


def test_block_stored_carries_no_token_ids_unless_opted_in(context: zmq.Context) -> None:
    private, verbose = publisher(), publisher(include_token_ids=True)
    try:
        event = first_block_stored(private, subscriber(context, private))
        assert event is not None and event.token_ids == []
        assert (event.block_hashes, event.parent_block_hash, event.block_size) == ([11, 12], None, PAGE)
        event = first_block_stored(verbose, subscriber(context, verbose))
        assert event is not None and event.token_ids == TOKENS
    finally:
        private.close()
        verbose.close()


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://[::]:5557", "tcp://eth0:5557", "tcp://10.1.2.3:5557"],
)
def test_endpoints_other_hosts_reach_need_curve_or_an_explicit_allowance(endpoint: str) -> None:
    with pytest.raises(ValueError, match="other hosts"):
        KVEventPublisher(endpoint, PAGE)
    check_endpoint(endpoint, allow_remote=True)
    check_endpoint(endpoint, encrypted=True)
    KVEventPublisher(endpoint, PAGE, curve_secret_key=zmq.curve_keypair()[1])  # not bound until start()


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.2:5557",
        "tcp://[::1]:5557",
        "tcp://localhost:5557",
        "ipc:///tmp/kv",
        "inproc://kv",
    ],
)
def test_endpoints_of_this_host_are_fine(endpoint: str) -> None:
    check_endpoint(endpoint)


def test_malformed_endpoints_are_refused() -> None:
    for endpoint in ("udp://127.0.0.1:5557", "127.0.0.1:5557", "tcp://127.0.0.1"):
        with pytest.raises(ValueError):
            check_endpoint(endpoint)


def test_curve_secret_key_files(tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    (tmp_path / "z85").write_bytes(secret + b"\n")
    assert load_curve_secret_key(tmp_path / "z85") == (public, secret)
    cert_public, cert_secret = zmq.auth.create_certificates(tmp_path, "server")
    assert load_curve_secret_key(cert_secret) == zmq.auth.load_certificate(cert_secret)
    for bad in (cert_public, tmp_path / "missing"):  # a public certificate holds no secret key
        with pytest.raises(ValueError, match="CURVE secret key"):
            load_curve_secret_key(bad)


def test_curve_events_reach_only_subscribers_that_speak_curve(context: zmq.Context) -> None:
    pub = publisher(curve_secret_key=zmq.curve_keypair()[1])
    try:
        assert first_block_stored(pub, subscriber(context, pub), attempts=20) is None  # plaintext
        event = first_block_stored(pub, subscriber(context, pub, keys=zmq.curve_keypair()))
        assert event is not None and event.block_hashes == [11, 12]
    finally:
        pub.close()


def test_curve_clients_dir_admits_only_listed_client_keys(context: zmq.Context, tmp_path: Path) -> None:
    allowed, secrets = tmp_path / "allowed", tmp_path / "secrets"
    allowed.mkdir()
    secrets.mkdir()
    client_public_file, client_secret_file = zmq.auth.create_certificates(secrets, "gateway")
    Path(client_public_file).rename(allowed / "gateway.key")  # the worker holds public keys only
    pub = publisher(curve_secret_key=zmq.curve_keypair()[1], curve_clients_dir=allowed)
    try:
        stranger = subscriber(context, pub, keys=zmq.curve_keypair())
        assert first_block_stored(pub, stranger, attempts=20) is None
        gateway_keys = zmq.auth.load_certificate(client_secret_file)
        assert gateway_keys[1] is not None
        event = first_block_stored(pub, subscriber(context, pub, keys=(gateway_keys[0], gateway_keys[1])))
        assert event is not None and event.token_ids == []
    finally:
        pub.close()


def test_client_keys_without_a_server_key_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret key"):
        KVEventPublisher("tcp://127.0.0.1:*", PAGE, curve_clients_dir=tmp_path)
