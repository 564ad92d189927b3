"""Keep a bridge's (or a directory cache's) documents fetched from the authorities and fresh.

A :class:`DirCache` fills a :class:`relay.dirstore.DirStore` and keeps it current; requests
are answered from the store (:mod:`relay.dirserver`), never proxied. One refresh, in order,
from one authority's DirPort (:func:`relay.dirclient.fetch`), the next authority after a
failure:

1. each configured consensus flavor (``microdesc``, and ``ns`` if asked: tor's caches serve
   both), with ``If-Modified-Since`` just past the one held, so an unchanged consensus costs a
   304 (no ``X-Or-Diff-From-Consensus``: an authority would then answer with a diff);
2. the key certificates of the signatures not yet covered (``/tor/keys/fp-sk/FP-SK+...``), each
   checked (:func:`relay.dirdocs.parse_key_certificates`); then every new consensus must be
   signed by more than half of the trusted authorities (their v3 identities are
   configuration), or it is refused;
3. the microdescriptors the new microdesc consensus lists and the store lacks, at most 90 per
   request (tor's limit for DirPort fetches), each kept only if its SHA-256 is one that was
   asked for;
4. compression of everything new into every served encoding, on a worker thread so the loop
   never stalls on lzma (``compress_in_thread=False`` does it inline), then installation on the
   loop thread in one step: certificates, microdescriptors, consensuses; microdescriptors the
   new consensus no longer lists are dropped, expired certificates too.

The next refresh follows tor's schedule for caches (``networkstatus.c``,
``update_consensus_networkstatus_fetch_time_impl``): a random time in the first half of the
interval after ``fresh-until`` plus a small slop (``min(120 s, interval / 16)``, at least 1 s),
always before ``valid-until``; in a testing network with 10-second intervals that is a second
or so after each new consensus. A failed refresh is retried after ``retry_initial`` seconds,
doubling up to ``retry_max``. ``on_update(cache)`` runs after each installation.

Threads: :class:`DirCache` is loop thread only; its compression runs on one private worker
thread and hands results back with ``Reactor.call_soon_threadsafe``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reactor.loop import Reactor, TimerHandle
from relay.dirclient import DEFAULT_TIMEOUT, DirRequest, DirResult, fetch
from relay.dirdocs import (
    ConsensusInfo,
    DirDocError,
    KeyCertificate,
    b64_digest,
    parse_consensus,
    parse_key_certificates,
    split_microdescs,
    verify_consensus,
)
from relay.dirstore import (
    ITEM_ENCODINGS,
    DirStore,
    Stored,
    StoredCertificate,
    StoredConsensus,
    store_document,
    stored_certificate,
    stored_consensus,
    stored_descriptor,
)

__all__ = ["MICRODESCS_PER_REQUEST", "Authority", "DirCache", "next_fetch_time"]

logger = logging.getLogger("relay.dircache")

#: tor's limit for one DirPort microdescriptor request (``max_dl_per_request``).
MICRODESCS_PER_REQUEST = 90
_CONSENSUS_PATH = {"microdesc": "/tor/status-vote/current/consensus-microdesc",
                   "ns": "/tor/status-vote/current/consensus"}


@dataclass(frozen=True)
class Authority:
    """A directory authority: its DirPort address and its v3 identity (hex)."""

    host: str
    dirport: int
    v3ident: str


def next_fetch_time(info: ConsensusInfo, now: float, rng: random.Random) -> float:
    """When a cache holding ``info`` fetches the next consensus (tor's rule for directory
    caches, module docstring); ``now`` if ``info`` is not live. Any thread (pure)."""
    if not info.valid_after <= now <= info.valid_until:
        return now
    interval = info.fresh_until - info.valid_after
    slop = min(120, interval // 16) or 1
    start = info.fresh_until + slop
    window = max(1, interval // 2)
    if start + window >= info.valid_until:
        start = info.valid_until - window - 1
    return float(start + rng.randrange(window))


@dataclass
class _Refresh:
    """What one refresh has gathered so far."""

    authority: Authority
    flavors: list[str]
    consensuses: list[ConsensusInfo]
    certificates: list[KeyCertificate]
    microdescs: dict[bytes, bytes]
    missing: list[bytes]


class DirCache:
    """Fetches and refreshes the documents a bridge serves (module docstring). Loop thread
    only."""

    def __init__(self, reactor: Reactor, authorities: Sequence[Authority],
                 store: DirStore | None = None, *, flavors: Sequence[str] = ("microdesc", "ns"),
                 timeout: float = DEFAULT_TIMEOUT, retry_initial: float = 5.0,
                 retry_max: float = 300.0, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 on_update: Callable[[DirCache], object] | None = None,
                 compress_in_thread: bool = True) -> None:
        """Nothing is fetched before ``start()``. Loop thread only."""
        if not authorities:
            raise ValueError("a cache needs at least one authority")
        unknown = set(flavors) - set(_CONSENSUS_PATH)
        if unknown or not flavors:
            raise ValueError(f"flavors must be among {sorted(_CONSENSUS_PATH)}")
        reactor.check_loop_thread("DirCache()")
        self._reactor = reactor
        self._authorities = list(authorities)
        self._trusted = frozenset(a.v3ident.upper() for a in authorities)
        self.store = store if store is not None else DirStore()
        self._flavors = list(flavors)
        self._timeout = timeout
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._on_update = on_update
        self._compress_in_thread = compress_in_thread
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._next_authority = 0
        self._failures = 0
        self._generation = 0
        self._timer: TimerHandle | None = None
        self._request: DirRequest | None = None
        self._running = False
        self.refreshes = 0
        self.installs = 0
        self.last_error: str | None = None
        self.next_fetch_at: float | None = None

    # ---------------------------------------------------------------- control

    def start(self) -> None:
        """Fetch now, then keep fresh. Loop thread only."""
        self._running = True
        self.refresh_now()

    def refresh_now(self) -> None:
        """Abandon any refresh in progress and start one. Loop thread only."""
        if not self._running:
            raise RuntimeError("DirCache.refresh_now() before start() or after stop()")
        self._cancel()
        self._generation += 1
        authority = self._authorities[self._next_authority % len(self._authorities)]
        self._step_consensus(_Refresh(authority, list(self._flavors), [], [], {}, []))

    def stop(self) -> None:
        """Stop fetching (``start()`` may follow); the store keeps what it has; the compressing
        thread exits. Loop thread only. Idempotent."""
        self._running = False
        self._generation += 1
        self._cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def set_own_descriptor(self, descriptor: str) -> None:
        """Serve ``descriptor`` as this relay's own. Raises
        :class:`relay.dirdocs.DirDocError` if it has no fingerprint or signature line.
        Loop thread only."""
        self.store.set_own_descriptor(stored_descriptor(descriptor))

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._request is not None:
            self._request.cancel()
            self._request = None

    # ---------------------------------------------------------------- the steps

    def _get(self, job: _Refresh, path: str, then: Callable[[_Refresh, DirResult], None],
             **options: object) -> None:
        generation = self._generation

        def done(result: DirResult) -> None:
            self._request = None
            if generation == self._generation:
                then(job, result)

        a = job.authority
        self._request = fetch(self._reactor, a.host, a.dirport, path, done,
                              timeout=self._timeout, **options)  # type: ignore[arg-type]

    def _step_consensus(self, job: _Refresh) -> None:
        if not job.flavors:
            self._step_certificates(job)
            return
        flavor = job.flavors[0]
        held = self.store.consensus(flavor)
        since = held.info.valid_after + 1 if held is not None else None
        self._get(job, _CONSENSUS_PATH[flavor], self._got_consensus, if_modified_since=since)

    def _got_consensus(self, job: _Refresh, result: DirResult) -> None:
        flavor = job.flavors.pop(0)
        if result.status == 304 and result.error is None:
            self._step_consensus(job)
            return
        if not result.ok:
            self._fail(job, f"consensus ({flavor}): {result.describe()}")
            return
        try:
            info = parse_consensus(result.body)
        except DirDocError as exc:
            self._fail(job, f"consensus ({flavor}): {exc}")
            return
        held = self.store.consensus(flavor)
        if info.flavor != flavor:
            self._fail(job, f"asked for a {flavor} consensus, got {info.flavor}")
            return
        if held is None or info.valid_after > held.info.valid_after:
            job.consensuses.append(info)
        self._step_consensus(job)

    def _step_certificates(self, job: _Refresh) -> None:
        wanted = sorted({(s.identity, s.signing_key_digest)
                         for info in job.consensuses for s in info.signatures
                         if s.identity in self._trusted
                         and self.store.certificate(s.identity, s.signing_key_digest) is None})
        if not wanted:
            self._verify(job)
            return
        path = "/tor/keys/fp-sk/" + "+".join(f"{fp}-{sk}" for fp, sk in wanted)
        self._get(job, path, self._got_certificates)

    def _got_certificates(self, job: _Refresh, result: DirResult) -> None:
        if not result.ok:
            self._fail(job, f"key certificates: {result.describe()}")
            return
        try:
            job.certificates = parse_key_certificates(result.body)
        except DirDocError as exc:
            self._fail(job, f"key certificates: {exc}")
            return
        self._verify(job)

    def _verify(self, job: _Refresh) -> None:
        known = {c.info.fingerprint: c.info for c in self.store.certificates()}
        for cert in job.certificates:
            known[cert.fingerprint] = cert
        for info in job.consensuses:
            try:
                verify_consensus(info, known, self._trusted)
            except DirDocError as exc:
                self._fail(job, f"consensus ({info.flavor}) refused: {exc}")
                return
        micro = next((i for i in job.consensuses if i.flavor == "microdesc"), None)
        if micro is not None:
            job.missing = sorted({d for d in micro.microdesc_digests
                                  if not self.store.has_microdesc(d)})
        self._step_microdescs(job)

    def _step_microdescs(self, job: _Refresh) -> None:
        if not job.missing:
            self._prepare(job)
            return
        batch = job.missing[:MICRODESCS_PER_REQUEST]
        path = "/tor/micro/d/" + "-".join(b64_digest(d) for d in batch)
        self._get(job, path, self._got_microdescs)

    def _got_microdescs(self, job: _Refresh, result: DirResult) -> None:
        batch = job.missing[:MICRODESCS_PER_REQUEST]
        del job.missing[:MICRODESCS_PER_REQUEST]
        if not result.ok:
            logger.warning("microdescriptors: %s", result.describe())
        else:
            asked = set(batch)
            try:
                for digest, text in split_microdescs(result.body, len(batch)):
                    if digest in asked:
                        job.microdescs[digest] = text
            except DirDocError as exc:
                logger.warning("microdescriptors: %s", exc)
        self._step_microdescs(job)

    # ---------------------------------------------------------------- installing

    def _prepare(self, job: _Refresh) -> None:
        generation = self._generation
        if not self._compress_in_thread:
            self._install(generation, job, _compress(job))
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="dircache-compress")
        future = self._executor.submit(_compress, job)

        def handed_back(done: concurrent.futures.Future[_Prepared]) -> None:
            if done.cancelled():
                return
            try:
                self._reactor.call_soon_threadsafe(self._prepared, generation, job, done)
            except RuntimeError:
                pass  # the reactor closed: nothing to install into

        future.add_done_callback(handed_back)

    def _prepared(self, generation: int, job: _Refresh,
                  done: concurrent.futures.Future[_Prepared]) -> None:
        try:
            prepared = done.result()
        except Exception as exc:  # a bug or a document that fails to compress
            logger.exception("preparing directory documents failed")
            self._fail(job, f"compressing: {exc!r}")
            return
        self._install(generation, job, prepared)

    def _install(self, generation: int, job: _Refresh, prepared: _Prepared) -> None:
        if generation != self._generation or not self._running:
            return
        store = self.store
        store.install_certificates(prepared.certificates)
        store.install_microdescs(prepared.microdescs)
        for consensus in prepared.consensuses:
            store.install_consensus(consensus)
            if consensus.info.flavor == "microdesc":
                store.retain_microdescs(consensus.info.microdesc_digests)
        now = self._clock()
        store.drop_expired_certificates(now)
        self.refreshes += 1
        if prepared.consensuses:
            self.installs += 1
            logger.info("directory cache: installed %s consensus (valid-after %d), %d new "
                        "microdescriptors, %d new certificates",
                        "+".join(c.info.flavor for c in prepared.consensuses),
                        prepared.consensuses[0].info.valid_after, len(prepared.microdescs),
                        len(prepared.certificates))
        self._schedule(now, job)
        if self._on_update is not None:
            try:
                self._on_update(self)
            except Exception:
                logger.exception("on_update raised")

    def _schedule(self, now: float, job: _Refresh) -> None:
        reference = self.store.consensus(self._flavors[0])
        when = next_fetch_time(reference.info, now, self._rng) if reference else now
        if when <= now:
            # Nothing newer than a consensus that is no longer fresh: back off as on failure.
            self._fail(job, "no consensus newer than the one held yet")
            return
        self._failures = 0
        self.last_error = None
        self._arm(when - now, when)

    def _fail(self, job: _Refresh, error: str) -> None:
        if not self._running:
            return
        self._failures += 1
        self._next_authority += 1
        self.last_error = f"{job.authority.host}:{job.authority.dirport}: {error}"
        delay = min(self._retry_max, self._retry_initial * 2 ** min(self._failures - 1, 30))
        logger.warning("directory cache refresh failed: %s; again in %g s", self.last_error,
                       delay)
        self._arm(delay, self._clock() + delay)

    def _arm(self, delay: float, when: float) -> None:
        self.next_fetch_at = when
        self._request = None
        self._timer = self._reactor.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._running:
            self.refresh_now()


@dataclass(frozen=True)
class _Prepared:
    consensuses: list[StoredConsensus]
    certificates: list[StoredCertificate]
    microdescs: dict[bytes, Stored]


def _compress(job: _Refresh) -> _Prepared:
    """Every new document in every served encoding. Any thread (pure, CPU-bound)."""
    return _Prepared([stored_consensus(info) for info in job.consensuses],
                     [stored_certificate(cert) for cert in job.certificates],
                     {d: store_document(text, ITEM_ENCODINGS)
                      for d, text in job.microdescs.items()})
