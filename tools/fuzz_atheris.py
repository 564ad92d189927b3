"""Coverage-guided fuzzing of the parsers a relay runs on a stranger's bytes, with atheris
(libFuzzer for Python). Optional: ``pip install atheris`` (binary wheels for CPython 3.11 on
x86-64 Linux), then::

    python tools/fuzz_atheris.py -runs=2000000          # or -max_total_time=600
    python tools/fuzz_atheris.py -runs=0 CORPUS_DIR     # replay a corpus

What is checked, and why
------------------------
The hypothesis suites (``tests/test_fuzz_*.py``) generate structured inputs; libFuzzer instead
mutates bytes guided by line coverage of the instrumented parsers, which finds the odd length
or count that reaches a path nobody thought of. One entry point dispatches on the first input
byte to every decoder of untrusted input: the cell stream framer (all link versions, the input
fed whole and cut at a point taken from the input), ``decode_cell``, ``RelayPayload.unpack``
and ``relay.circuits.relay_body`` (which must agree), VERSIONS, NETINFO, CERTS, BEGIN, and the
CREATE2 / CREATED2 / EXTENDED2 / EXTEND2 bodies. Each must return or raise its documented error
type; anything else (IndexError, struct.error, a disagreement) is a crash libFuzzer reports with
the input that caused it.

Threads: single-threaded; no sockets, no files but libFuzzer's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, before imports

with atheris.instrument_imports():
    from relay.cells import CellFormatError, RelayPayload, decode_cell, parse_cells, parse_versions
    from relay.circuits import relay_body
    from relay.exit import parse_begin
    from relay.handshakes import (
        BodyError,
        Extend2Body,
        decode_create2,
        decode_created2,
        decode_extended2,
    )
    from relay.link import decode_netinfo
    from relay.torcerts import CertsError, parse_certs_cell
    from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX


def framing(data: bytes) -> None:
    """Whole or cut at any point, the framer yields the same cells, re-encoding to the input."""
    if len(data) < 2:
        return
    version, cut, blob = data[0] % 7, data[1], data[2:]
    cells, end = parse_cells(blob, 0, version)
    if b"".join(c.encode(version) for c in cells) != blob[:end]:
        raise AssertionError("framed cells do not re-encode to the bytes consumed")
    cut = cut * len(blob) // 256
    first, first_end = parse_cells(blob[:cut], 0, version)
    rest, _ = parse_cells(blob[first_end:], 0, version)
    if first + rest != cells:
        raise AssertionError("framing depends on where the stream was cut")
    try:
        decode_cell(blob, version)
    except CellFormatError:
        pass


def relay_payload(data: bytes) -> None:
    """The readable and the data-path relay parsers agree."""
    payload = data[:CELL_PAYLOAD_LEN].ljust(CELL_PAYLOAD_LEN, b"\0")
    try:
        parsed = RelayPayload.unpack(payload)
    except CellFormatError:
        parsed = None
    try:
        fast = relay_body(payload)
    except ValueError:
        fast = None
    if (parsed is None) != (fast is None):
        raise AssertionError("RelayPayload.unpack and relay_body disagree on acceptance")
    if parsed is not None and fast != (parsed.command, parsed.stream_id, parsed.data):
        raise AssertionError("RelayPayload.unpack and relay_body read different fields")
    if parsed is not None and len(parsed.data) > RELAY_DATA_MAX:
        raise AssertionError("relay data longer than 498 bytes accepted")


def bodies(data: bytes) -> None:
    """Every other decoder: its own error type or a value."""
    for decode, errors in (
        (parse_versions, (CellFormatError,)),
        (decode_netinfo, (CellFormatError,)),
        (parse_certs_cell, (CertsError,)),
        (parse_begin, (ValueError,)),
        (decode_create2, (BodyError,)),
        (decode_created2, (BodyError,)),
        (decode_extended2, (BodyError,)),
    ):
        try:
            decode(data)
        except errors:
            pass
    try:
        body = Extend2Body.decode(data)
    except BodyError:
        return
    body.address()
    body.legacy_id()


TARGETS = (framing, relay_payload, bodies)


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point: the first byte picks the target."""
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


def main() -> None:
    """Run libFuzzer with the command line's options."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
