"""What TLS record work costs per cell, and whether two threads crypt TLS in parallel.

What is measured
----------------
* **Per-cell cost on the calling thread.** A client/server session pair (``relay.tls``,
  pyOpenSSL over memory buffers) after the handshake: ``encrypt`` of 64 KiB chunks of whole
  514-byte cells (127 cells, 65,278 bytes per call), and ``feed`` of the resulting records in
  64 KiB reads, as a link does with a Stream's writes and reads. The same with an
  ``ssl.SSLObject`` pair over ``ssl.MemoryBIO`` (the standard library's TLS, which the link
  used before), driven with the same calls the old session made (``write`` then read the
  outgoing buffer; write the incoming buffer then ``read`` until it wants more). Reported as
  microseconds per cell (best of ``--repeat`` runs) for each side, plus the protocol and suite
  negotiated, since the cipher decides much of the cost. The same with one cell per call shows
  the fixed cost of a call.
* **Two threads.** Each thread pushes ``--mib`` MiB through its own session pair (encrypt on
  one session, feed the records to the other, check the byte count). One thread doing both
  pairs' work in turn is the baseline; the ratio baseline-time / two-thread-time is the
  speed-up: ~2 if the C calls run without the GIL and the Python around them is small, ~1 if
  everything is serialised, below 1 if the threads lose time handing the GIL to each other
  (every OpenSSL call releases it, and a record is only 16 KiB of work). Only meaningful on a
  machine with two idle cores.

Run::

    python -m benchmarks.tls_sessions [--mib 64] [--repeat 5] [--json]
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

from relay.tls import TlsClientSession, TlsServerContext, TlsServerSession

CELL = 514
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


class _PyOpenSSLPair(_Pair):
    def __init__(self, context: TlsServerContext) -> None:
        client, server = TlsClientSession(), TlsServerSession(context)
        to_server = client.start()
        while not (client.handshake_done and server.handshake_done):
            _, to_client = server.feed(to_server)
            _, to_server = client.feed(to_client)
        self.send = client.encrypt
        self.receive = lambda records: server.feed(records)[0]
        self.version, self.cipher = client.version() or "", client.cipher() or ""


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
    """Best (encrypt, feed) microseconds per cell over ``chunks`` calls of ``cells_per_call``
    cells; every byte that comes out is checked."""
    size = cells_per_call * CELL
    plain = (bytes(range(256)) * (size // 256 + 1))[:size]
    enc, dec = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        records = [pair.send(plain) for _ in range(chunks)]
        enc.append(time.perf_counter() - start)
        # Records must reach the receiver in the order they were made: feed this run's all.
        pieces = [r[i : i + READ_SIZE] for r in records for i in range(0, len(r), READ_SIZE)]
        start = time.perf_counter()
        out = [pair.receive(p) for p in pieces]
        dec.append(time.perf_counter() - start)
        if b"".join(out) != plain * chunks:
            raise AssertionError("the receiving session did not return the bytes sent")
    cells = chunks * cells_per_call
    return min(enc) / cells * 1e6, min(dec) / cells * 1e6


def _costs(pair: _Pair, mib: int, repeat: int) -> dict[str, object]:
    chunks = max(1, (mib << 20) // (CHUNK_CELLS * CELL) // 4)
    big = _per_cell(pair, chunks, CHUNK_CELLS, repeat)
    one = _per_cell(pair, chunks * 8, 1, repeat)
    return {"version": pair.version, "cipher": pair.cipher,
            "encrypt_us_per_cell": big[0], "feed_us_per_cell": big[1],
            "encrypt_us_one_cell_per_call": one[0], "feed_us_one_cell_per_call": one[1]}


def _pump(pair: _Pair, total: int, cpu: list[float] | None = None) -> None:
    """Move ``total`` bytes through ``pair`` in 64 KiB chunks; add this thread's CPU seconds
    to ``cpu``."""
    plain = bytes(CHUNK_CELLS * CELL)
    moved = 0
    start = time.thread_time()
    while moved < total:
        moved += len(pair.receive(pair.send(plain)))
    if cpu is not None:
        cpu.append(time.thread_time() - start)


def _threads(context: TlsServerContext, mib: int, repeat: int) -> dict[str, float]:
    total = mib << 20
    one, two, overlap = [], [], []
    for _ in range(repeat):
        pairs = [_PyOpenSSLPair(context), _PyOpenSSLPair(context)]
        start = time.perf_counter()
        for pair in pairs:
            _pump(pair, total)
        one.append(time.perf_counter() - start)
        pairs = [_PyOpenSSLPair(context), _PyOpenSSLPair(context)]
        cpu: list[float] = []
        threads = [threading.Thread(target=_pump, args=(p, total, cpu)) for p in pairs]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        two.append(time.perf_counter() - start)
        overlap.append(sum(cpu) / two[-1])
    best = min(range(repeat), key=two.__getitem__)
    # cpu_per_wall: the two threads' CPU seconds over the wall time of that run: ~2 when they
    # really ran at once, ~1 when one waited for the other (the GIL, or a busy machine).
    return {"one_thread_s": min(one), "two_threads_s": two[best],
            "speedup": min(one) / two[best], "cpu_per_wall": overlap[best]}


def measure(mib: int, repeat: int) -> dict[str, object]:
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
    return {
        "pyopenssl": _costs(_PyOpenSSLPair(context), mib, repeat),
        "ssl_module": _costs(stdlib, mib, repeat),
        "threads": {"mib_per_thread": mib, **_threads(context, mib, repeat)},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB per thread (default 64)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best counts")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    result = measure(args.mib, args.repeat)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in ("pyopenssl", "ssl_module"):
        r = result[name]
        assert isinstance(r, dict)
        print(f"{name:10s} {r['version']} {r['cipher']}: encrypt {r['encrypt_us_per_cell']:.3f}"
              f" us/cell, feed {r['feed_us_per_cell']:.3f} us/cell (64 KiB chunks); one cell per"
              f" call: encrypt {r['encrypt_us_one_cell_per_call']:.2f} us, feed "
              f"{r['feed_us_one_cell_per_call']:.2f} us")
    t = result["threads"]
    assert isinstance(t, dict)
    print(f"threads: {t['mib_per_thread']} MiB each; one thread {t['one_thread_s']:.2f} s, "
          f"two threads {t['two_threads_s']:.2f} s, speed-up {t['speedup']:.2f}x, "
          f"their CPU per wall second {t['cpu_per_wall']:.2f}")


if __name__ == "__main__":
    main()
