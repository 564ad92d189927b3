"""relay.tls client and server sessions: with each other in memory, with Python's ``ssl`` and
OpenSSL's command-line tools over loopback sockets, against garbage, and across threads.

The exporter values are checked both ways: equal on the two ends of one session (ours and
ours), and equal to what an independent implementation computes (``openssl s_client`` and
``s_server`` print the RFC 5705 value for a label, with no context). Tor as a TLS *client* of
our server is tests/test_tls_tor_client.py; tor as the server of our client is
tests/test_tor_interop.py.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support_tls import (
    SocketServer,
    credentials,
    handshake,
    send_through,
    write_pem,
)

from relay._tls import TLS1_2_VERSION
from relay.tls import (
    TlsClientContext,
    TlsClientSession,
    TlsError,
    TlsServerContext,
    TlsServerSession,
)

pytestmark = pytest.mark.timeout(120)

AUTH_LABEL = b"EXPORTER FOR TOR TLS CLIENT BINDING AUTH0003"
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


@pytest.fixture(scope="module")
def server_context() -> TlsServerContext:
    return TlsServerContext(*credentials())


def connected(context: TlsServerContext,
              client_context: TlsClientContext | None = None
              ) -> tuple[TlsClientSession, TlsServerSession]:
    client, server = TlsClientSession(context=client_context), TlsServerSession(context)
    handshake(client, server)
    return client, server


# ------------------------------------------------------------------ ours with ours, in memory

def test_handshake_certificates_and_negotiation(server_context: TlsServerContext) -> None:
    client, server = TlsClientSession(), TlsServerSession(server_context)
    for session in (client, server):
        assert not session.handshake_done
        assert session.version() is None and session.cipher() is None
        assert session.peer_certificate_der() is None
        with pytest.raises(TlsError, match="before the TLS handshake"):
            session.encrypt(b"too early")
        with pytest.raises(TlsError, match="before the TLS handshake"):
            session.export_keying_material(AUTH_LABEL, 32, b"")
    handshake(client, server)
    assert client.version() == server.version() == "TLSv1.3"
    assert client.cipher() == server.cipher() and client.cipher()
    # The server's certificate as sent is what the client received: AUTHENTICATE hashes both.
    assert client.peer_certificate_der() == server.own_certificate_der()
    assert server.own_certificate_der() == server_context.certificate_der
    # No client certificate on a Tor link.
    assert client.own_certificate_der() is None
    assert server.peer_certificate_der() is None
    assert server.server_name() is None  # our client sends no SNI unless asked


SIZES = [1, 2, 509, 514, 515, 16383, 16384, 16385, 65278, 65536, 200_003, (1 << 20) + 7]


@pytest.mark.parametrize("piece", [1000, 1 << 16])
def test_bytes_both_ways_many_sizes(server_context: TlsServerContext, piece: int) -> None:
    client, server = connected(server_context)
    for size in SIZES:
        up, down = os.urandom(size), os.urandom(size)
        assert send_through(client, server, up, piece) == up
        assert send_through(server, client, down, piece) == down
    assert client.encrypt(b"") == b""
    # Interleaved: records of both directions in flight at once stay in order.
    ups = [os.urandom(3000 + i) for i in range(20)]
    downs = [os.urandom(5000 - i) for i in range(20)]
    to_server = b"".join(client.encrypt(u) for u in ups)
    to_client = b"".join(server.encrypt(d) for d in downs)
    assert server.feed(to_server) == (b"".join(ups), b"")
    assert client.feed(to_client) == (b"".join(downs), b"")


def test_records_fed_one_byte_at_a_time(server_context: TlsServerContext) -> None:
    client, server = connected(server_context)
    message = os.urandom(3 * 514)
    assert send_through(client, server, message, 1) == message


def test_application_data_in_the_clients_last_flight(server_context: TlsServerContext) -> None:
    """A client writes its first cell right after its Finished (as tor's VERSIONS): the server
    gets both in one read and hands out the plaintext with the handshake's completion."""
    client, server = TlsClientSession(), TlsServerSession(server_context)
    _, to_client = server.feed(client.start())
    _, finished = client.feed(to_client)
    assert client.handshake_done and not server.handshake_done
    versions = b"\x00\x00\x07\x00\x06\x00\x03\x00\x04\x00\x05"
    plain, _ = server.feed(finished + client.encrypt(versions))
    assert server.handshake_done
    assert plain == versions


def test_exporter_equal_on_both_ends_and_bound_to_label_and_context(
        server_context: TlsServerContext) -> None:
    client, server = connected(server_context)
    ed_id = os.urandom(32)
    value = client.export_keying_material(AUTH_LABEL, 32, ed_id)
    assert len(value) == 32
    assert server.export_keying_material(AUTH_LABEL, 32, ed_id) == value
    assert client.export_keying_material(AUTH_LABEL, 32, ed_id) == value  # repeatable
    assert client.export_keying_material(AUTH_LABEL, 32, os.urandom(32)) != value
    assert client.export_keying_material(AUTH_LABEL + b"X", 32, ed_id) != value
    assert server.export_keying_material(AUTH_LABEL, 64, ed_id) == \
        client.export_keying_material(AUTH_LABEL, 64, ed_id)
    # In TLS 1.3 "no context" and an empty context are the same (RFC 8446, 7.5).
    assert client.export_keying_material(AUTH_LABEL, 32) == \
        server.export_keying_material(AUTH_LABEL, 32, b"")
    # Another session, same label and context: another secret.
    other_client, _ = connected(server_context)
    assert other_client.export_keying_material(AUTH_LABEL, 32, ed_id) != value


def test_tls12_session_and_its_exporter(server_context: TlsServerContext) -> None:
    """A peer that stops at TLS 1.2 still gets a link (tor's minimum), with an ECDHE suite;
    the exporter agrees on both ends and, in TLS 1.2, tells "no context" from an empty one."""
    old = TlsClientContext(max_version=TLS1_2_VERSION)
    client, server = connected(server_context, old)
    assert client.version() == server.version() == "TLSv1.2"
    assert (client.cipher() or "").startswith("ECDHE-")
    assert client.export_keying_material(AUTH_LABEL, 32, b"ctx") == \
        server.export_keying_material(AUTH_LABEL, 32, b"ctx")
    assert client.export_keying_material(AUTH_LABEL, 32, None) == \
        server.export_keying_material(AUTH_LABEL, 32, None)
    assert client.export_keying_material(AUTH_LABEL, 32, None) != \
        client.export_keying_material(AUTH_LABEL, 32, b"")
    data = os.urandom(100_000)
    assert send_through(client, server, data, 4096) == data


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_notify_both_ways(server_context: TlsServerContext, closer: str) -> None:
    client, server = connected(server_context)
    first, second = (client, server) if closer == "client" else (server, client)
    # Data sent before the alert arrives before the end.
    tail = first.encrypt(b"last words")
    alert = first.close()
    assert alert
    assert first.close() == b""  # idempotent
    with pytest.raises(TlsError, match="closed"):
        first.encrypt(b"x")
    with pytest.raises(TlsError, match="closed"):
        first.feed(b"x")
    assert not second.peer_closed
    plain, _ = second.feed(tail + alert)
    assert plain == b"last words"
    assert second.peer_closed
    # The other end may still answer with its own close_notify.
    assert second.close()


def test_server_name_sent_when_asked(server_context: TlsServerContext) -> None:
    client = TlsClientSession("www.qwertyuiopasd.com")
    server = TlsServerSession(server_context)
    handshake(client, server)
    assert server.server_name() == "www.qwertyuiopasd.com"


# ------------------------------------------------------------------ credentials and rotation

def test_credentials_from_der_and_pem_bytes() -> None:
    cert, key = credentials()
    der = cert.public_bytes(serialization.Encoding.DER)
    pem_key = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der_key = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    for c, k in ((der, pem_key), (cert.public_bytes(serialization.Encoding.PEM), der_key),
                 (cert, key)):
        context = TlsServerContext(c, k)
        assert context.certificate_der == der
        client, _ = connected(context)
        assert client.peer_certificate_der() == der


def test_unusable_credentials_are_refused() -> None:
    cert, key = credentials()
    _, other_key = credentials()
    with pytest.raises(TlsError, match="not usable together"):
        TlsServerContext(cert, other_key)
    with pytest.raises(TlsError, match="cannot load the TLS certificate"):
        TlsServerContext(b"not a certificate", key)
    with pytest.raises(TlsError, match="cannot load the TLS private key"):
        TlsServerContext(cert, b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----")


def test_rotation_affects_new_sessions_only() -> None:
    cert1, key1 = credentials("www.first.net")
    cert2, key2 = credentials("www.second.net")
    der1 = cert1.public_bytes(serialization.Encoding.DER)
    der2 = cert2.public_bytes(serialization.Encoding.DER)
    context = TlsServerContext(cert1, key1)
    running_client, running_server = connected(context)
    created_before = TlsServerSession(context)  # made before the rotation, handshakes after

    context.rotate(cert2, key2)
    assert context.certificate_der == der2

    late_client = TlsClientSession()
    handshake(late_client, created_before)
    assert late_client.peer_certificate_der() == der1
    new_client, new_server = connected(context)
    assert new_client.peer_certificate_der() == der2
    assert new_server.own_certificate_der() == der2
    # The running session goes on with its keys and certificate.
    assert send_through(running_client, running_server, b"still here", 100) == b"still here"
    assert running_server.own_certificate_der() == der1

    # A rotation that fails changes nothing.
    with pytest.raises(TlsError):
        context.rotate(cert1, key2)
    assert context.certificate_der == der2
    assert connected(context)[0].peer_certificate_der() == der2


# ------------------------------------------------------------------ garbage peers

def test_plain_text_to_the_server_is_refused(server_context: TlsServerContext) -> None:
    server = TlsServerSession(server_context)
    with pytest.raises(TlsError, match=r"TLS handshake failed: \w"):
        server.feed(b"GET / HTTP/1.0\r\nHost: relay\r\n\r\n")
    with pytest.raises(TlsError, match="closed"):
        server.feed(b"more")


def test_plain_text_to_the_client_is_refused() -> None:
    client = TlsClientSession()
    client.start()
    with pytest.raises(TlsError, match=r"TLS handshake failed: \w"):
        client.feed(b"SSH-2.0-OpenSSH_9.2\r\n" * 4)


def test_truncated_handshake(server_context: TlsServerContext) -> None:
    """A ClientHello cut short waits for the rest (TCP may deliver it later: the link's stream
    end or timeout ends such a connection); a hello whose record says it is complete but whose
    message is cut short is refused."""
    hello = TlsClientSession().start()
    waiting = TlsServerSession(server_context)
    assert waiting.feed(hello[: len(hello) // 2]) == (b"", b"")
    assert not waiting.handshake_done

    # Record header: type, version (2), length (2); then the handshake header: type, length (3).
    body = bytearray(hello[5:])
    cut = len(body) // 2
    body[1:4] = (cut - 4 + 40).to_bytes(3, "big")  # the message claims 40 bytes past the record
    record = hello[:3] + cut.to_bytes(2, "big") + bytes(body[:cut])
    shortened = TlsServerSession(server_context)
    with pytest.raises(TlsError, match=r"TLS handshake failed: \w"):
        shortened.feed(record + b"\x17\x03\x03\x00\x10" + bytes(16))


@pytest.mark.parametrize("direction", ["to-server", "to-client"])
def test_corrupt_record_is_refused(server_context: TlsServerContext, direction: str) -> None:
    client, server = connected(server_context)
    sender, receiver = (client, server) if direction == "to-server" else (server, client)
    records = bytearray(sender.encrypt(b"a cell" * 100))
    records[len(records) // 2] ^= 0x01
    with pytest.raises(TlsError, match=r"TLS record error: \w"):
        receiver.feed(bytes(records))
    with pytest.raises(TlsError, match="closed"):
        receiver.feed(b"")


# ------------------------------------------------------------------ threads

def test_sessions_move_between_threads_one_at_a_time(server_context: TlsServerContext) -> None:
    """Handshake on this thread, then each session owned by one worker thread at a time,
    handed over through queues; two pairs run concurrently; every byte arrives in order."""
    def encrypter(session: TlsClientSession, chunks: list[bytes],
                  out: queue.Queue[bytes | None]) -> None:
        for chunk in chunks:
            out.put(session.encrypt(chunk))
        out.put(None)

    def decrypter(session: TlsServerSession, inbox: queue.Queue[bytes | None],
                  got: bytearray) -> None:
        while (records := inbox.get()) is not None:
            got += session.feed(records)[0]

    runs = []
    for _ in range(2):
        client, server = connected(server_context)
        chunks = [os.urandom(514 * n) for n in range(1, 60)]
        pipe: queue.Queue[bytes | None] = queue.Queue()
        got = bytearray()
        threads = [threading.Thread(target=encrypter, args=(client, chunks, pipe)),
                   threading.Thread(target=decrypter, args=(server, pipe, got))]
        runs.append((client, server, chunks, got, threads))
    for *_, threads in runs:
        for t in threads:
            t.start()
    for client, server, chunks, got, threads in runs:
        for t in threads:
            t.join(60)
        assert bytes(got) == b"".join(chunks)
        # Back on this thread, the sessions go on.
        assert send_through(server, client, b"reply", 10) == b"reply"


# ------------------------------------------------------------------ Python's ssl, over sockets

def _echo(session: TlsServerSession, send: Callable[[bytes], None], plain: bytes) -> bool:
    if plain:
        send(session.encrypt(plain))
    return False


def test_python_ssl_client_over_loopback(server_context: TlsServerContext,
                                         tmp_path: Path) -> None:
    server = SocketServer(server_context, _echo)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # A client that has a certificate sends it only when asked: our server never asks.
    context.load_cert_chain(*write_pem(tmp_path, *credentials("www.client-cert.org")))
    message = os.urandom((1 << 20) + 12345)
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as raw, \
            context.wrap_socket(raw, server_hostname="www.python-client.org") as tls:
        assert tls.version() == "TLSv1.3"
        assert tls.getpeercert(binary_form=True) == server_context.certificate_der
        echoed = bytearray()
        # One chunk at a time, reading the echo back before the next: both ends block on
        # sockets, so sending everything first could fill both directions' buffers.
        for start in range(0, len(message), 1 << 16):
            chunk = message[start : start + (1 << 16)]
            tls.sendall(chunk)
            want = start + len(chunk)
            while len(echoed) < want:
                data = tls.recv(1 << 16)
                assert data, "server closed early"
                echoed += data
        assert bytes(echoed) == message
        tls.unwrap()  # our close_notify; waits for the server's
    server.join()
    assert server.error is None
    assert server.peer_closed_at_end
    assert bytes(server.received) == message
    assert server.session.server_name() == "www.python-client.org"
    assert server.session.peer_certificate_der() is None


def test_python_ssl_client_limited_to_tls11_is_refused(server_context: TlsServerContext) -> None:
    server = SocketServer(server_context, _echo)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"this Python's OpenSSL cannot speak TLS 1.1 at all: {exc}")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as raw, \
            pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(raw).close()
    server.join()
    assert server.error is not None
    assert "TLS handshake failed" in str(server.error)
    assert "protocol" in str(server.error)


# ------------------------------------------------------------------ OpenSSL's command-line tools

def _keying_material(output: str) -> bytes:
    match = re.search(r"Keying material: ([0-9A-Fa-f]+)", output)
    assert match, f"no keying material in the tool's output:\n{output}"
    return bytes.fromhex(match.group(1))


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_openssl_s_client_against_our_server(server_context: TlsServerContext,
                                             version: str) -> None:
    assert OPENSSL is not None
    label = "EXPORTER-relaycrypt-test"

    def greet_then_close(session: TlsServerSession, send: Callable[[bytes], None],
                         plain: bytes) -> bool:
        if plain:
            send(session.encrypt(b"hello from relaycrypt\n"))
            return True  # close_notify ends s_client
        return False

    server = SocketServer(server_context, greet_then_close)
    result = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", version, "-ign_eof",
         "-servername", "www.s-client.net", "-keymatexport", label, "-keymatexportlen", "32"],
        input=b"ping\n", capture_output=True, timeout=30)
    server.join()
    out = result.stdout.decode(errors="replace")
    assert server.error is None, server.error
    assert bytes(server.received) == b"ping\n"
    assert "hello from relaycrypt" in out
    expected_version = "TLSv1.3" if version == "-tls1_3" else "TLSv1.2"
    assert server.session.version() == expected_version
    assert server.session.server_name() == "www.s-client.net"
    assert _keying_material(out) == server.session.export_keying_material(label.encode(), 32)


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_our_client_against_openssl_s_server(tmp_path: Path, version: str) -> None:
    assert OPENSSL is not None
    cert, key = credentials("www.s-server.net")
    cert_path, key_path = write_pem(tmp_path, cert, key)
    label = "EXPORTER-relaycrypt-test"
    tool = subprocess.Popen(
        [OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", version,
         "-cert", str(cert_path), "-key", str(key_path),
         "-keymatexport", label, "-keymatexportlen", "32"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert tool.stdout is not None and tool.stdin is not None
    try:
        seen = []
        while not (port := re.match(rb"ACCEPT 127\.0\.0\.1:(\d+)", line := tool.stdout.readline())):
            assert line, b"s_server exited: " + b"".join(seen)
            seen.append(line)
        client = TlsClientSession()
        with socket.create_connection(("127.0.0.1", int(port.group(1))), timeout=20) as sock:
            sock.sendall(client.start())
            while not client.handshake_done:
                data = sock.recv(1 << 16)
                assert data, "s_server closed during the handshake"
                _, to_write = client.feed(data)
                sock.sendall(to_write)
            sock.sendall(client.encrypt(b"hello s_server\n"))
            tool.stdin.write(b"hello client\n")
            tool.stdin.flush()
            got = b""
            while b"\n" not in got:
                data = sock.recv(1 << 16)
                assert data, "s_server closed early"
                got += client.feed(data)[0]
            ours = client.export_keying_material(label.encode(), 32)
            sock.sendall(client.close())
        out = tool.communicate(timeout=20)[0].decode(errors="replace")
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert got == b"hello client\n"
    assert "hello s_server" in out
    assert client.version() == ("TLSv1.3" if version == "-tls1_3" else "TLSv1.2")
    assert client.peer_certificate_der() == cert.public_bytes(serialization.Encoding.DER)
    assert _keying_material(out) == ours


# ------------------------------------------------------------------ the benchmark runs

def test_tls_benchmark_runs_and_checks_bytes() -> None:
    """``python -m benchmarks.tls_sessions`` exits 0 with its keys (figures are not checked:
    this machine is shared; the benchmark itself checks every byte it moves)."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "benchmarks.tls_sessions", "--mib", "1",
                             "--repeat", "1", "--group", "2", "--json"], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for name in ("c", "pyopenssl", "ssl_module"):
        assert report[name]["version"] == "TLSv1.3"
        for key in ("encrypt_us_per_cell", "decrypt_us_per_cell",
                    "encrypt_us_one_cell_per_call", "decrypt_us_one_cell_per_call"):
            assert report[name][key] > 0
    threads = report["threads"]
    assert threads["mib_per_thread"] == 1 and threads["group"] == 2
    for name in ("pyopenssl", "c_session", "c_group"):
        assert set(threads[name]) == {"one_thread_s", "two_threads_s", "speedup",
                                      "cpu_per_wall"}
