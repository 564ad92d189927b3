"""The C TLS kernel (relay._tls): record calls, groups, errors, contexts, and threads.

relay.tls's sessions are the kernel's sessions, so tests/test_tls_sessions.py covers the
handshake, exporter, certificates, rotation, garbage and the peers over sockets; here are the
kernel's own promises: decrypt takes any split of the byte stream, encrypt takes pieces and
makes full records, tls_group gives each job what the method gives (errors stay with their
job, a session's jobs run in order), and threads: the GIL is released inside OpenSSL, two
links crypt at once with every byte checked, one session refuses a second thread (its reads and
writes too). No timing assertions: a test observes an interleaving that is only possible when
the GIL was released, and bounds its loops by the worker's progress.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
from cryptography.hazmat.primitives import serialization
from support_kernel import Runner
from support_tls import credentials, handshake

from relay import _tls
from relay._tls import OP_DECRYPT, OP_ENCRYPT, TlsContext, TlsSession, tls_group
from relay.tls import (
    TlsClientContext,
    TlsClientSession,
    TlsError,
    TlsServerContext,
    TlsServerSession,
)
from relay.tlscontext import load_private_key

pytestmark = pytest.mark.timeout(120)

CELL = 514
BIG = os.urandom(8 << 20)  # a worker's call long enough for another thread to see it running


@pytest.fixture(scope="module")
def server_context() -> TlsServerContext:
    return TlsServerContext(*credentials())


def connected(context: TlsServerContext) -> tuple[TlsClientSession, TlsServerSession]:
    client, server = TlsClientSession(), TlsServerSession(context)
    handshake(client, server)
    return client, server


def decrypt_in_pieces(session: TlsSession, stream: bytes, cuts: list[int]) -> bytes:
    """Decrypt ``stream`` cut at the sorted offsets ``cuts``, one call per piece."""
    bounds = [0, *cuts, len(stream)]
    return b"".join(session.decrypt(stream[a:b]) for a, b in itertools.pairwise(bounds))


# ------------------------------------------------------------------ the session type

def test_relay_tls_sessions_are_kernel_sessions(server_context: TlsServerContext) -> None:
    client, server = TlsClientSession(), TlsServerSession(server_context)
    assert isinstance(client, TlsSession) and isinstance(server, TlsSession)
    assert not client.server and server.server
    # The kernel's types can be used directly, with its contexts.
    raw_client = TlsSession(TlsContext(False), "www.raw.net")
    raw_server = TlsSession(server_context.kernel)
    handshake(raw_client, raw_server)
    assert raw_client.version() == raw_server.version() == "TLSv1.3"
    assert raw_server.server_name() == "www.raw.net"
    assert raw_client.peer_certificate_der() == server_context.certificate_der
    assert raw_server.decrypt(raw_client.encrypt(b"cell")) == b"cell"


def test_record_work_needs_the_handshake_and_an_open_session(
        server_context: TlsServerContext) -> None:
    client = TlsClientSession()
    client.start()
    with pytest.raises(TlsError, match=r"cannot decrypt .* before the TLS handshake"):
        client.decrypt(b"\x17\x03\x03\x00\x01x")
    with pytest.raises(TlsError, match=r"cannot send .* before the TLS handshake"):
        client.encrypt(b"x")
    assert client.close() == b"" and client.closed  # nothing was agreed: nothing to send
    with pytest.raises(TlsError, match="closed"):
        client.feed(b"")
    client, server = connected(server_context)
    alert = client.close()
    assert alert and client.closed
    with pytest.raises(TlsError, match="closed"):
        client.decrypt(b"")
    with pytest.raises(TlsError, match="closed"):
        client.encrypt(b"")
    assert server.decrypt(alert) == b"" and server.peer_closed and not server.closed


# ------------------------------------------------------------------ decrypt and encrypt

def test_decrypt_takes_any_split_of_the_stream(server_context: TlsServerContext) -> None:
    """Records cut anywhere (inside a header, inside a body, at the boundaries), fed as bytes,
    bytearrays, memoryviews or lists of pieces, give back exactly the bytes sent."""
    client, server = connected(server_context)
    rng = random.Random(5705)
    messages = [os.urandom(size) for size in (1, 514, 16384, 16385, 65278, 200_003)]
    for message in messages:
        stream = client.encrypt(message)
        cuts = sorted(rng.sample(range(1, len(stream)), min(40, len(stream) - 1)))
        assert decrypt_in_pieces(server, stream, cuts) == message
    for message in messages:  # the whole stream in one call, as a list of pieces
        stream = client.encrypt(message)
        cuts = sorted(rng.sample(range(1, len(stream)), min(7, len(stream) - 1)))
        bounds = [0, *cuts, len(stream)]
        pieces = [bytearray(stream[a:b]) if i % 2 else memoryview(stream)[a:b]
                  for i, (a, b) in enumerate(itertools.pairwise(bounds))]
        assert server.decrypt(pieces) == message
    # One byte at a time across a 16 KiB record: each call completes at most one record.
    stream = client.encrypt(bytes(range(256)) * 64)
    assert b"".join(server.decrypt(stream[i : i + 1]) for i in range(len(stream))) == \
        bytes(range(256)) * 64


def test_encrypt_pieces_make_the_records_one_buffer_would(
        server_context: TlsServerContext) -> None:
    client, server = connected(server_context)
    cells = [os.urandom(CELL) for _ in range(127)]
    joined = b"".join(cells)
    one = client.encrypt(joined)
    many = client.encrypt(cells)
    # Same number of records of the same sizes: pieces are gathered into full records.
    assert len(many) == len(one) == len(joined) + 4 * 22  # 4 TLS 1.3 records, 22 bytes each
    assert server.decrypt(one + many) == joined * 2
    odd = [b"", b"a", os.urandom(16384), bytearray(os.urandom(20000)), memoryview(b"tail"),
           os.urandom(40000), b""]
    assert server.decrypt(client.encrypt(odd)) == b"".join(bytes(p) for p in odd)
    assert client.encrypt([]) == b"" and client.encrypt(b"") == b""


def test_close_notify_inside_a_read(server_context: TlsServerContext) -> None:
    """Data before the alert comes out, peer_closed is set, what follows the alert is ignored
    and later reads give nothing; the other side may still send and close."""
    client, server = connected(server_context)
    stream = client.encrypt(b"last cells") + client.close() + b"\x17\x03\x03\x00\x05junk!"
    assert server.decrypt(stream) == b"last cells"
    assert server.peer_closed and not server.closed
    assert server.decrypt(b"") == b""
    alert = server.close()
    assert alert and server.close() == b""


# ------------------------------------------------------------------ groups

def test_group_gives_each_job_what_the_method_gives(server_context: TlsServerContext) -> None:
    pairs = [connected(server_context) for _ in range(3)]
    payloads = [os.urandom(CELL * n) for n in (1, 40, 127)]
    records = tls_group([(c, OP_ENCRYPT, p) for (c, _), p in zip(pairs, payloads, strict=True)])
    assert all(isinstance(r, bytes) for r in records)
    plains = tls_group([(s, OP_DECRYPT, r) for (_, s), r in zip(pairs, records, strict=True)])
    assert plains == payloads
    # Several jobs of one session run in list order: both directions of a link in one group.
    client, server = pairs[0]
    up1, up2, down = os.urandom(3000), os.urandom(70000), os.urandom(5000)
    out = tls_group([(client, OP_ENCRYPT, up1), (client, OP_ENCRYPT, [up2])])
    results = tls_group([(server, OP_DECRYPT, out[0]), (server, OP_ENCRYPT, down),
                         (server, OP_DECRYPT, out[1])])
    assert results[0] == up1 and results[2] == up2
    assert client.decrypt(results[1]) == down
    assert tls_group([]) == []
    assert tls_group(()) == []


def test_group_errors_stay_with_their_job(server_context: TlsServerContext) -> None:
    (good_c, good_s), (bad_c, bad_s) = connected(server_context), connected(server_context)
    corrupt = bytearray(bad_c.encrypt(b"cell" * 100))
    corrupt[len(corrupt) // 2] ^= 1
    fresh = TlsClientSession()
    jobs: list[object] = [
        (good_s, OP_DECRYPT, good_c.encrypt(b"first")),
        (bad_s, OP_DECRYPT, bytes(corrupt)),
        (bad_s, OP_ENCRYPT, b"after the failure"),  # same session, later in the group
        ("not a session", OP_DECRYPT, b""),
        (good_s, 7, b""),
        (good_s, OP_DECRYPT),
        (fresh, OP_ENCRYPT, b"too early"),
        (good_s, OP_DECRYPT, good_c.encrypt(b"second")),
    ]
    results = tls_group(jobs)
    assert results[0] == b"first" and results[7] == b"second"
    assert isinstance(results[1], TlsError) and "TLS record error:" in str(results[1])
    assert isinstance(results[2], TlsError) and "closed" in str(results[2])
    assert isinstance(results[3], TypeError)
    assert isinstance(results[4], ValueError)
    assert isinstance(results[5], TypeError)
    assert isinstance(results[6], TlsError) and "before the TLS handshake" in str(results[6])
    assert bad_s.closed and not good_s.closed
    with pytest.raises(TypeError):
        tls_group("not a list")  # type: ignore[arg-type]


# ------------------------------------------------------------------ contexts

def test_context_arguments_are_checked() -> None:
    cert, key = credentials()
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    key_der = load_private_key(key).private_bytes(serialization.Encoding.DER,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption())
    _, other_key = credentials()
    other_der = other_key.private_bytes(serialization.Encoding.DER,
                                        serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
    server = TlsContext(True, cert_der, key_der)
    assert server.server and server.certificate_der == cert_der
    assert TlsContext(False).certificate_der is None
    with pytest.raises(ValueError, match="needs cert_der"):
        TlsContext(True)
    with pytest.raises(ValueError, match="takes no certificate"):
        TlsContext(False, cert_der, key_der)
    with pytest.raises(ValueError, match="max_version"):
        TlsContext(False, max_version=0x0301)
    with pytest.raises(TlsError, match="cannot load the TLS certificate"):
        TlsContext(True, b"\x30\x03\x02\x01\x00", key_der)
    with pytest.raises(TlsError, match="cannot load the TLS private key"):
        TlsContext(True, cert_der, b"\x30\x03\x02\x01\x00")
    with pytest.raises(TlsError, match="not usable together"):
        TlsContext(True, cert_der, other_der)  # a traditional-format key loads, but not his
    with pytest.raises(ValueError, match="server_hostname is for client"):
        TlsSession(server, "www.x.net")
    with pytest.raises(ValueError, match="ASCII"):
        TlsSession(TlsContext(False), "www.bücher.de")
    with pytest.raises(TypeError):
        TlsSession(object())


def test_tls12_only_server(server_context: TlsServerContext) -> None:
    old = TlsServerContext(*credentials(), max_version=_tls.TLS1_2_VERSION)
    client, server = TlsClientSession(context=TlsClientContext()), TlsServerSession(old)
    handshake(client, server)
    assert client.version() == server.version() == "TLSv1.2"
    assert (server.cipher() or "").startswith("ECDHE-")
    assert server.decrypt(client.encrypt(b"x" * 70000)) == b"x" * 70000


# ------------------------------------------------------------------ threads

def test_python_runs_while_a_session_is_in_openssl(server_context: TlsServerContext) -> None:
    """The test thread runs loop iterations while the worker's session is in use: only possible
    if the worker's call released the GIL. The handshake's values stay readable meanwhile."""
    client, _ = connected(server_context)
    runner = Runner(lambda: client.encrypt(BIG))
    runner.start()
    counted_inside = 0
    while runner.is_alive() and counted_inside < 1000:
        if client.in_use:
            counted_inside += 1
            assert client.version() == "TLSv1.3" and client.handshake_done  # no claim needed
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert counted_inside > 0


def test_two_links_crypt_at_once_byte_for_byte(server_context: TlsServerContext) -> None:
    """Two workers, each owning one link (both of its sessions), one through the methods and
    one through tls_group; both are seen inside OpenSSL at the same moment, and every byte
    comes out as sent."""
    links = [connected(server_context), connected(server_context)]
    got: list[bytearray] = [bytearray(), bytearray()]
    chunk = [BIG[: 4 << 20], BIG[4 << 20 :]]

    def by_methods() -> None:
        client, server = links[0]
        got[0] += server.decrypt(client.encrypt(chunk[0]))

    def by_group() -> None:
        client, server = links[1]
        records = tls_group([(client, OP_ENCRYPT, chunk[1])])[0]
        got[1] += tls_group([(server, OP_DECRYPT, records)])[0]

    runners = [Runner(by_methods), Runner(by_group)]
    for r in runners:
        r.start()
    both_inside = False
    while not both_inside and all(r.is_alive() for r in runners):
        both_inside = any(s.in_use for s in links[0]) and any(s.in_use for s in links[1])
    for r in runners:
        r.stop.set()
        r.join()
    assert [r.error for r in runners] == [None, None]
    assert both_inside
    for i, r in enumerate(runners):
        assert bytes(got[i]) == chunk[i] * r.calls


def test_one_session_refuses_a_second_thread(server_context: TlsServerContext) -> None:
    """While a worker encrypts on a session, a read on it from another thread (a method or a
    group job) raises RuntimeError instead of racing inside OpenSSL; the worker's stream is
    intact afterwards."""
    client, server = connected(server_context)
    sent = bytearray()
    runner = Runner(lambda: sent.extend(client.encrypt(BIG)))
    runner.start()
    refused: RuntimeError | None = None
    group_refused: object = None
    while (refused is None or group_refused is None) and runner.is_alive():
        try:
            client.decrypt(b"")
        except RuntimeError as exc:
            refused = exc
        if client.in_use:
            result = tls_group([(client, OP_DECRYPT, b""), (server, OP_ENCRYPT, b"")])
            if isinstance(result[0], RuntimeError):
                group_refused = result
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert refused is not None and "in use" in str(refused)
    assert isinstance(group_refused, list) and group_refused[1] == b""  # the other job ran
    assert server.decrypt(bytes(sent)) == BIG * runner.calls
    assert server.decrypt(client.encrypt(b"after")) == b"after"


def test_input_is_pinned_while_openssl_reads_it(server_context: TlsServerContext) -> None:
    """A bytearray being encrypted cannot be resized by another thread meanwhile (BufferError),
    so the kernel never reads freed memory."""
    client, _ = connected(server_context)
    data = bytearray(BIG)
    runner = Runner(lambda: client.encrypt([b"head", data]))
    runner.start()
    blocked = False
    while not blocked and runner.is_alive():
        if client.in_use:
            try:
                data.extend(b"x")
            except BufferError:
                blocked = True
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert blocked
