"""What TLS record work costs per cell, and whether two threads crypt TLS in parallel.

Three implementations of a client/server session pair over memory, after the handshake:

* ``c``: ``relay.tls`` sessions, i.e. the C kernel ``relay._tls`` on the system's libssl
  (``encrypt`` / ``decrypt``, the GIL released for the whole call);
* ``pyopenssl``: pyOpenSSL ``Connection`` objects over memory BIOs with the same settings (what
  ``relay.tls`` was before the kernel): ``sendall`` then read the outgoing BIO; write the
  incoming BIO then ``recv`` until it wants more;
* ``ssl_module``: ``ssl.SSLObject`` over ``ssl.MemoryBIO`` (the standard library's TLS), the
  same calls.

What is measured
----------------
* **Per-cell cost on the calling thread.** ``encrypt`` of 64 KiB chunks of whole 514-byte
  cells (127 cells, 65,278 bytes per call) and decryption of the resulting records in 64 KiB
  reads, as a link does with a Stream's writes and reads; microseconds per cell, best of
  ``--repeat`` runs, for each side, plus the protocol and suite negotiated (the cipher decides
  much of the cost). The same with one cell per call shows the fixed cost of a call.
* **Two threads.** Each thread pushes ``--mib`` MiB through its own session pairs (encrypt on
  one end, decrypt on the other, every byte checked by count). One thread doing both threads'
  work in turn is the baseline; baseline-time / two-thread-time is the speed-up: ~2 when the
  record work runs without the GIL and the Python around it is small, ~1 when everything is
  serialised, below 1 when the threads lose time handing the GIL to each other. Variants:
  ``pyopenssl`` (one pair per thread; every OpenSSL call releases the GIL, a record is 16 KiB
  of work), ``c_session`` (one pair per thread, one session per call) and ``c_group`` (``--group``
  pairs per thread, one ``relay._tls.tls_group`` call per direction for all of them, as the
  worker pool would). ``cpu_per_wall`` is the two threads' CPU seconds over the wall time: ~2
  when they really ran at once. Only meaningful on a machine with two idle cores.

Run::

    python -m benchmarks.tls_sessions [--mib 64] [--repeat 5] [--group 4] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from relay._tls import OP_DECRYPT, OP_ENCRYPT, SERVER_TLS12_CIPHERS, tls_group
from relay.framing import FIXED_CELL_LEN
from relay.tls import TlsClientSession, TlsServerContext, TlsServerSession

CHUNK_CELLS = 127  # 127 * 514 = 65,278 bytes: the largest run of whole cells under 64 KiB
READ_SIZE = 1 << 16


def _credentials() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.bench-relay.net")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert, key


class _Pair:
    """A connected pair with ``send(plain) -> records`` and ``receive(records) -> plain``."""

    send: Callable[[bytes], bytes]
    receive: Callable[[bytes], bytes]
    version: str
    cipher: str


class _CPair(_Pair):
    def __init__(self, context: TlsServerContext) -> None:
        self.client, self.server = TlsClientSession(), TlsServerSession(context)
        to_server = self.client.start()
        while not (self.client.handshake_done and self.server.handshake_done):
            _, to_client = self.server.feed(to_server)
            _, to_server = self.client.feed(to_client)
        self.send = self.client.encrypt
        self.receive = self.server.decrypt
        self.version, self.cipher = self.client.version() or "", self.client.cipher() or ""


class _PyOpenSSLPair(_Pair):
    def __init__(self, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
        server_ctx = SSL.Context(SSL.TLS_METHOD)
        client_ctx = SSL.Context(SSL.TLS_METHOD)
        for ctx in (server_ctx, client_ctx):
            ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
            ctx.set_options(SSL.OP_NO_COMPRESSION)
            ctx.set_verify(SSL.VERIFY_NONE)
        server_ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
        server_ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        server_ctx.set_cipher_list(SERVER_TLS12_CIPHERS.encode())
        server_ctx.use_certificate(cert)
        server_ctx.use_privatekey(key)
        client, server = SSL.Connection(client_ctx, None), SSL.Connection(server_ctx, None)
        client.set_connect_state()
        server.set_accept_state()
        for _ in range(10):
            for conn, peer in ((client, server), (server, client)):
                try:
                    conn.do_handshake()
                except SSL.WantReadError:
                    pass
                out = self._drain(conn)
                if out:
                    peer.bio_write(out)
        self.version = client.get_protocol_version_name()
        self.cipher = client.get_cipher_name() or ""

        def send(plain: bytes) -> bytes:
            client.sendall(plain)
            return self._drain(client)

        def receive(records: bytes) -> bytes:
            server.bio_write(records)
            chunks = []
            while True:
                try:
                    chunks.append(server.recv(1 << 14))
                except SSL.WantReadError:
                    break
            return b"".join(chunks)

        self.send, self.receive = send, receive

    @staticmethod
    def _drain(conn: SSL.Connection) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(conn.bio_read(1 << 17))
            except SSL.WantReadError:
                break
        return b"".join(chunks)


class _StdlibPair(_Pair):
    def __init__(self, cert_path: Path, key_path: Path) -> None:
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE
        cctx.minimum_version = ssl.TLSVersion.TLSv1_2
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(cert_path, key_path)
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = cctx.wrap_bio(c_in, c_out, server_side=False)
        server = sctx.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for obj in (client, server):
                try:
                    obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        self.version, self.cipher = client.version() or "", (client.cipher() or ("",))[0]

        def send(plain: bytes) -> bytes:
            client.write(plain)
            return c_out.read()

        def receive(records: bytes) -> bytes:
            s_in.write(records)
            chunks = []
            while True:
                try:
                    chunks.append(server.read(READ_SIZE))
                except ssl.SSLWantReadError:
                    break
            return b"".join(chunks)

        self.send, self.receive = send, receive


def _per_cell(pair: _Pair, chunks: int, cells_per_call: int, repeat: int) -> tuple[float, float]:
    """Best (encrypt, decrypt) microseconds per cell over ``chunks`` calls of ``cells_per_call``
    cells; every byte that comes out is checked."""
    size = cells_per_call * FIXED_CELL_LEN
    plain = (bytes(range(256)) * (size // 256 + 1))[:size]
    enc, dec = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        records = [pair.send(plain) for _ in range(chunks)]
        enc.append(time.perf_counter() - start)
        # Records must reach the receiver in the order they were made: feed this run's all.
        # One cell per call: one call per record, as a link reading each cell as it comes.
        if cells_per_call == 1:
            pieces = records
        else:
            stream = b"".join(records)
            pieces = [stream[i : i + READ_SIZE] for i in range(0, len(stream), READ_SIZE)]
        start = time.perf_counter()
        out = [pair.receive(p) for p in pieces]
        dec.append(time.perf_counter() - start)
        if b"".join(out) != plain * chunks:
            raise AssertionError("the receiving session did not return the bytes sent")
    cells = chunks * cells_per_call
    return min(enc) / cells * 1e6, min(dec) / cells * 1e6


def _costs(pair: _Pair, mib: int, repeat: int) -> dict[str, object]:
    chunks = max(1, (mib << 20) // (CHUNK_CELLS * FIXED_CELL_LEN) // 4)
    big = _per_cell(pair, chunks, CHUNK_CELLS, repeat)
    one = _per_cell(pair, chunks * 8, 1, repeat)
    return {"version": pair.version, "cipher": pair.cipher,
            "encrypt_us_per_cell": big[0], "decrypt_us_per_cell": big[1],
            "encrypt_us_one_cell_per_call": one[0], "decrypt_us_one_cell_per_call": one[1]}


Work = Callable[[], int]
"""One step of a thread's work: moves some bytes through its pairs, returns how many."""


def _pair_work(pair: _Pair) -> Work:
    plain = bytes(CHUNK_CELLS * FIXED_CELL_LEN)

    def step() -> int:
        return len(pair.receive(pair.send(plain)))
    return step


def _group_work(pairs: list[_CPair]) -> Work:
    plain = bytes(CHUNK_CELLS * FIXED_CELL_LEN)
    clients = [p.client for p in pairs]
    servers = [p.server for p in pairs]

    def step() -> int:
        records = tls_group([(c, OP_ENCRYPT, plain) for c in clients])
        plains = tls_group([(s, OP_DECRYPT, r) for s, r in zip(servers, records, strict=True)])
        return sum(len(p) for p in plains)
    return step


def _pump(work: Work, total: int, cpu: list[float] | None = None) -> None:
    """Run ``work`` until ``total`` bytes moved; add this thread's CPU seconds to ``cpu``."""
    moved = 0
    start = time.thread_time()
    while moved < total:
        moved += work()
    if cpu is not None:
        cpu.append(time.thread_time() - start)


def _threads(make: Callable[[], Work], mib: int, repeat: int) -> dict[str, float]:
    total = mib << 20
    one, two, overlap = [], [], []
    for _ in range(repeat):
        works = [make(), make()]
        start = time.perf_counter()
        for work in works:
            _pump(work, total)
        one.append(time.perf_counter() - start)
        works = [make(), make()]
        cpu: list[float] = []
        threads = [threading.Thread(target=_pump, args=(w, total, cpu)) for w in works]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        two.append(time.perf_counter() - start)
        overlap.append(sum(cpu) / two[-1])
    best = min(range(repeat), key=two.__getitem__)
    return {"one_thread_s": min(one), "two_threads_s": two[best],
            "speedup": min(one) / two[best], "cpu_per_wall": overlap[best]}


def measure(mib: int, repeat: int, group: int) -> dict[str, object]:
    """All the figures, as a dict (see the module doc)."""
    cert, key = _credentials()
    context = TlsServerContext(cert, key)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        stdlib = _StdlibPair(cert_path, key_path)
    group_mib = max(1, mib // group)
    return {
        "c": _costs(_CPair(context), mib, repeat),
        "pyopenssl": _costs(_PyOpenSSLPair(cert, key), mib, repeat),
        "ssl_module": _costs(stdlib, mib, repeat),
        "threads": {
            "mib_per_thread": mib,
            "group": group,
            "pyopenssl": _threads(lambda: _pair_work(_PyOpenSSLPair(cert, key)), mib, repeat),
            "c_session": _threads(lambda: _pair_work(_CPair(context)), mib, repeat),
            # group pairs per thread, each moving mib/group: the same bytes per thread
            "c_group": _threads(lambda: _group_work([_CPair(context) for _ in range(group)]),
                                group_mib * group, repeat),
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB per thread (default 64)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best counts")
    parser.add_argument("--group", type=int, default=4,
                        help="session pairs per thread in the c_group runs (default 4)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    result = measure(args.mib, args.repeat, args.group)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in ("c", "pyopenssl", "ssl_module"):
        r = result[name]
        assert isinstance(r, dict)
        print(f"{name:10s} {r['version']} {r['cipher']}: encrypt {r['encrypt_us_per_cell']:.3f}"
              f" us/cell, decrypt {r['decrypt_us_per_cell']:.3f} us/cell (64 KiB chunks); one"
              f" cell per call: encrypt {r['encrypt_us_one_cell_per_call']:.2f} us, decrypt "
              f"{r['decrypt_us_one_cell_per_call']:.2f} us")
    t = result["threads"]
    assert isinstance(t, dict)
    for name in ("pyopenssl", "c_session", "c_group"):
        r = t[name]
        print(f"threads {name:10s} ({t['mib_per_thread']} MiB each; group {t['group']}): one "
              f"thread {r['one_thread_s']:.2f} s, two threads {r['two_threads_s']:.2f} s, "
              f"speed-up {r['speedup']:.2f}x, CPU per wall second {r['cpu_per_wall']:.2f}")


if __name__ == "__main__":
    main()
