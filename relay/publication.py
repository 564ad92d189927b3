"""A relay's directory side: its server descriptor, published and served, and the documents it
caches for its clients.

:class:`RelayDirectory` belongs to one ``relay.node.RelayNode``:

* it builds the relay's signed server descriptor (``RelayIdentity.server_descriptor``) from
  the configuration: address and ORPort, the exit policy's descriptor lines, an honest
  ``proto`` line (``relay.identity.descriptor.RELAYCRYPT_PROTOCOLS``: only what is
  implemented), bandwidth, contact, ``tunnelled-dir-server`` (every relay answers BEGIN_DIR);
* unless the relay is a bridge it uploads the descriptor to every configured directory
  authority and keeps it uploaded (``relay.dirclient.DescriptorPublisher``: again when it
  changes, periodically, with backoff on failure);
* with authorities configured it keeps the current consensus, the authorities' key
  certificates and the microdescriptors in a cache (``relay.dircache.DirCache``), refreshed on
  tor's schedule, so that a bridge client can bootstrap from the relay and a client can use it
  as a directory cache; and it answers each BEGIN_DIR stream from that cache and its own
  descriptor (:meth:`RelayDirectory.dir_server`, ``relay.dirserver.DirServer``).

:meth:`RelayDirectory.republish` rebuilds the descriptor after a key rotation (a new onion key
or signing key must reach the authorities before clients use it).

Threads: loop thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from reactor import Reactor
from relay.config import RelayConfig
from relay.dircache import Authority, DirCache
from relay.dirclient import DescriptorPublisher, DirResult
from relay.dirserver import DirServer
from relay.dirstore import DirStore, stored_descriptor
from relay.identity.descriptor import RouterInfo
from relay.identity.keys import RelayIdentity

__all__ = ["RelayDirectory"]

log = logging.getLogger("relay.directory")


class RelayDirectory:
    """The descriptor, its publication, and the directory cache of one relay. Loop thread
    only."""

    def __init__(self, reactor: Reactor, identity: RelayIdentity, config: RelayConfig,
                 *, clock: Callable[[], float] = time.time) -> None:
        """Nothing is built or fetched before :meth:`start`. Loop thread only."""
        self._reactor = reactor
        self._identity = identity
        self._config = config
        self._clock = clock
        self._started_at = clock()
        self._or_port = 0
        self._exit_lines: tuple[str, ...] = ("reject *:*",)
        self.store = DirStore()
        self.descriptor: str | None = None
        self.publisher: DescriptorPublisher | None = None
        self.cache: DirCache | None = None
        self.uploads_ok = 0
        self.uploads_failed = 0
        # whether the descriptor carries the TAP onion key (RelayConfig.publish_tap_key)
        self.with_tap = config.publish_tap_key is not False
        self.tap_switches = 0
        self.dir_requests = 0

    def start(self, or_port: int, exit_lines: Sequence[str]) -> None:
        """Build the descriptor for ``or_port`` and the exit policy's ``exit_lines``; publish
        and cache as configured. Loop thread only."""
        self._or_port = or_port
        self._exit_lines = tuple(exit_lines) or ("reject *:*",)
        self.descriptor = self._build()
        self.store.set_own_descriptor(stored_descriptor(self.descriptor))
        authorities = self._config.dir_authorities
        if not authorities:
            return
        if not self._config.bridge:
            self.publisher = DescriptorPublisher(
                self._reactor, [(a.address, a.dir_port) for a in authorities], self.descriptor,
                refresh=self._refresh, on_outcome=self._on_upload)
            self.publisher.start()
        with_v3 = [Authority(a.address, a.dir_port, a.v3ident) for a in authorities
                   if a.v3ident]
        if with_v3:
            self.cache = DirCache(self._reactor, with_v3, self.store)
            self.cache.start()

    def republish(self, reason: str) -> None:
        """Rebuild the descriptor (keys changed) and upload it again. Loop thread only."""
        if self.descriptor is None:
            return
        self.descriptor = self._build()
        self.store.set_own_descriptor(stored_descriptor(self.descriptor))
        if self.publisher is not None:
            self.publisher.update(self.descriptor, reason)

    def dir_server(self, send: Callable[[bytes], object],
                   end: Callable[[str], object]) -> DirServer:
        """A directory server for one BEGIN_DIR stream. Loop thread only."""
        self.dir_requests += 1
        return DirServer(self.store, send, end, bridge=self._config.bridge)

    def close(self) -> None:
        """Stop uploading and refreshing. Idempotent. Loop thread only."""
        if self.publisher is not None:
            self.publisher.stop()
        if self.cache is not None:
            self.cache.stop()

    def stats(self) -> dict[str, Any]:
        """Counters (JSON-ready). Loop thread only."""
        return {
            "descriptor_uploads_ok": self.uploads_ok,
            "descriptor_uploads_failed": self.uploads_failed,
            "descriptor_accepted": bool(self.publisher and self.publisher.accepted),
            "descriptor_with_tap_key": self.with_tap,
            "descriptor_tap_switches": self.tap_switches,
            "dir_requests": self.dir_requests,
            "consensus_cached": self.store.consensus("microdesc") is not None,
            "microdescs_cached": self.store.microdesc_count,
        }

    # ------------------------------------------------------------------ internals

    def _build(self) -> str:
        config = self._config
        now = self._clock()
        info = RouterInfo(
            nickname=config.nickname,
            address=config.published_address,
            or_port=self._or_port,
            bandwidth_rate=config.bandwidth_rate,
            bandwidth_burst=config.bandwidth_burst,
            uptime=int(now - self._started_at),
            contact=config.contact,
            exit_policy=self._exit_lines,
            tunnelled_dir_server=True,
        )
        return self._identity.server_descriptor(info, now, with_tap=self.with_tap)

    def _refresh(self) -> str:
        self.descriptor = self._build()
        self.store.set_own_descriptor(stored_descriptor(self.descriptor))
        return self.descriptor

    def _on_upload(self, authority: tuple[str, int], result: DirResult, delay: float) -> None:
        if result.ok:
            self.uploads_ok += 1
            log.info("%s: descriptor uploaded to %s:%d (next in %.0f s)", self._config.nickname,
                     authority[0], authority[1], delay)
        else:
            self.uploads_failed += 1
            log.warning("%s: descriptor upload to %s:%d failed: %s (retry in %.0f s)",
                        self._config.nickname, authority[0], authority[1], result.describe(),
                        delay)
            if result.status == 400 and self._config.publish_tap_key is None \
                    and self.uploads_ok == 0:
                self._switch_tap_key()

    def _switch_tap_key(self) -> None:
        """An authority refused the descriptor and none has taken it: try the other form
        (authorities of tor 0.4.9.11 require the TAP onion key, later ones refuse it; a refusal
        for another reason makes the forms alternate, which costs nothing more)."""
        self.with_tap = not self.with_tap
        self.tap_switches += 1
        log.warning("%s: publishing the descriptor %s the TAP onion key from now on",
                    self._config.nickname, "with" if self.with_tap else "without")
        self.republish("the TAP onion key " + ("added" if self.with_tap else "left out"))
