"""tor1.backend: kernel by default, reference when forced or when the kernel is
missing, and the same joined-buffer API and bytes from both."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest

from tor1 import CELL_PAYLOAD_LEN
from tor1 import backend as crypto_backend
from tor1.backend import (
    FORCE_PURE_ENV,
    ReferenceOriginCrypto,
    ReferenceRelayCrypto,
    backend_name,
    origin_crypto_for,
    relay_crypto_for,
)
from tor1.fast import FastOriginCrypto, FastRelayCrypto
from tor1.reference import HopKeys, UnrecognizedCell


def hop_keys(rng: random.Random, n: int) -> list[HopKeys]:
    return [HopKeys.from_material(rng.randbytes(72)) for _ in range(n)]


def payloads(rng: random.Random, n: int) -> bytes:
    cells = bytearray(rng.randbytes(n * CELL_PAYLOAD_LEN))
    for i in range(n):
        cells[i * CELL_PAYLOAD_LEN + 1 : i * CELL_PAYLOAD_LEN + 3] = b"\0\0"
    return bytes(cells)


def test_kernel_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FORCE_PURE_ENV, raising=False)
    assert crypto_backend.kernel_available()
    assert crypto_backend.kernel_missing_reason() is None
    assert backend_name() == "kernel"
    keys = hop_keys(random.Random(1), 3)
    assert isinstance(relay_crypto_for(keys[0]), FastRelayCrypto)
    assert isinstance(origin_crypto_for(keys), FastOriginCrypto)
    monkeypatch.setenv(FORCE_PURE_ENV, "0")
    assert backend_name() == "kernel"


def test_env_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_PURE_ENV, "1")
    assert backend_name() == "reference"
    keys = hop_keys(random.Random(2), 3)
    assert isinstance(relay_crypto_for(keys[0]), ReferenceRelayCrypto)
    assert isinstance(origin_crypto_for(iter(keys)), ReferenceOriginCrypto)


def test_missing_kernel_falls_back_to_the_reference() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tor1._kernel._tor1"] = None  # as if the extension was never built
        from tor1 import backend as cb
        assert not cb.kernel_available()
        assert "_tor1" in cb.kernel_missing_reason()
        assert cb.backend_name() == "reference"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_buffer_forms_agree_between_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    keys = hop_keys(rng, 3)
    rounds = [(payloads(rng, 7), payloads(rng, 5)) for _ in range(4)]
    logs: dict[str, list[object]] = {}
    for force in ("0", "1"):
        monkeypatch.setenv(FORCE_PURE_ENV, force)
        origin, relays = origin_crypto_for(keys), [relay_crypto_for(k) for k in keys]
        log: list[object] = []
        for to_exit, from_exit in rounds:
            wire = origin.encrypt_buf(to_exit, 2)
            log.append(wire)
            for relay in relays:
                wire, recognized = relay.forward_buf(memoryview(wire))
                log.append((wire, recognized))
            back = relays[2].originate_buf(from_exit)
            back = relays[0].backward_buf(relays[1].backward_buf(bytearray(back)))
            log.append(origin.decrypt_buf(back))
        logs[force] = log
    assert logs["0"] == logs["1"]
    assert logs["0"][3][1] == b"\x01" * 7  # the exit recognized every cell


def test_unrecognized_buffer_raises_the_same_on_both(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(4)
    keys = hop_keys(rng, 2)
    relay = relay_crypto_for(keys[1])
    cells = bytearray(relay.originate_buf(payloads(rng, 4)))
    cells = bytearray(relay_crypto_for(keys[0]).backward_buf(cells))
    cells[2 * CELL_PAYLOAD_LEN + 30] ^= 1
    seen = []
    for force in ("0", "1"):
        monkeypatch.setenv(FORCE_PURE_ENV, force)
        with pytest.raises(UnrecognizedCell) as info:
            origin_crypto_for(keys).decrypt_buf(bytes(cells))
        seen.append((info.value.index, info.value.results))
    assert seen[0] == seen[1]
    assert seen[0][0] == 2 and [hop for hop, _ in seen[0][1]] == [1, 1]


def test_reference_adapter_rejects_partial_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_PURE_ENV, "1")
    relay = relay_crypto_for(hop_keys(random.Random(5), 1)[0])
    with pytest.raises(ValueError, match="multiple of 509"):
        relay.backward_buf(bytes(600))
