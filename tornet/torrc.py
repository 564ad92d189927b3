"""torrc text for each role in the private network: authority, relay (exit, bridge), client.

Every function here is pure: it returns a list of :class:`Option` (key, value, and for the
options that are not obvious a one-line reason), and :func:`render` turns that into the torrc,
with each reason as a comment above its option so the files explain themselves when kept with
``--keep``. Options that every node needs come from :func:`common`; the role functions add to
it. Only 127.0.0.1 appears in any of them: the network dials nothing else.

The values are the ones measured to bootstrap a one-authority network in seconds with Debian's
tor 0.4.9 (the defaults of ``TestingTorNetwork 1`` are listed in tor's ``testnet.inc``; the
ones this package relies on are repeated explicitly, with why).

Threads: any thread (pure).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tornet.netns import LOOPBACK

__all__ = [
    "Option",
    "authority",
    "client",
    "common",
    "dirauth_line",
    "relay",
    "render",
]


@dataclass(frozen=True)
class Option:
    """One torrc line ``key value``; ``why`` (if any) is written as a comment above it."""

    key: str
    value: str
    why: str = ""


def render(options: Iterable[Option]) -> str:
    """The torrc text: one option a line, each reason as a ``#`` comment above its option.
    Any thread (pure)."""
    lines: list[str] = []
    for option in options:
        if "\n" in option.value or "\n" in option.key:
            raise ValueError(f"a torrc value cannot span lines: {option}")
        if option.why:
            lines.append(f"# {option.why}")
        lines.append(f"{option.key} {option.value}".rstrip())
    return "\n".join(lines) + "\n"


def dirauth_line(nickname: str, orport: int, dirport: int, v3ident: str, fingerprint: str) -> str:
    """The value of a ``DirAuthority`` option naming one authority of this network (the part
    after the key). Any thread (pure)."""
    return (f"{nickname} orport={orport} no-v2 v3ident={v3ident} "
            f"{LOOPBACK}:{dirport} {fingerprint}")


def common(
    *,
    nickname: str,
    data_dir: Path,
    log_file: Path,
    dirauths: Sequence[str],
    control_port: int | None,
    owner_pid: int | None,
    log_level: str = "notice",
) -> list[Option]:
    """What every tor of the network has: test-network mode, the authorities, its own data
    directory and log, a cookie-authenticated ControlPort on 127.0.0.1, and fast shutdown.
    Any thread (pure)."""
    if not dirauths:
        raise ValueError("a tor of this network needs at least one DirAuthority line")
    options = [
        Option("TestingTorNetwork", "1",
               "test-network defaults: private addresses allowed, AuthDirMaxServersPerAddr 0, "
               "no download back-off"),
        Option("DataDirectory", str(data_dir)),
        Option("Nickname", nickname),
        Option("Log", f"{log_level} file {log_file}"),
        Option("SafeLogging", "0", "log real addresses: this is a test network on loopback"),
        Option("ProtocolWarnings", "1", "log every protocol violation a peer commits"),
        *(Option("DirAuthority", line) for line in dirauths),
        Option("UseDefaultFallbackDirs", "0", "never the public network's fallback directories"),
        Option("ClientUseIPv6", "0"),
        Option("PathsNeededToBuildCircuits", "0.67",
               "with a handful of relays, wait for 2/3 of the descriptors, not 60 % of "
               "the bandwidth (which one fast relay can hold)"),
        Option("FetchDirInfoEarly", "1",
               "fetch like a cache: from the authority (relays here are no caches), and each "
               "new microdescriptor at once (a client waits up to 60 s for more to batch)"),
        Option("ShutdownWaitLength", "0", "a relay stops at once on SIGINT (default 30 s)"),
        Option("__DisablePredictedCircuits", "1",
               "no circuits built ahead: every circuit here is the controller's (with exits to "
               "127.0.0.1 only no relay counts as an exit, and tor's internal circuits fail)"),
        Option("Sandbox", "0"),
    ]
    if control_port is not None:
        options += [
            Option("ControlPort", f"{LOOPBACK}:{control_port}"),
            Option("CookieAuthentication", "1",
                   "the controller reads DataDirectory/control_auth_cookie"),
        ]
    if owner_pid is not None:
        options.append(Option(
            "__OwningControllerProcess", str(owner_pid),
            "exit by itself (tor polls every 15 s) if the process that started it is gone"))
    return options


def _dns_for_relays(resolv_conf: Path) -> list[Option]:
    return [
        Option("ServerDNSResolvConfFile", str(resolv_conf),
               "nameserver 127.0.0.1 only: exits connect by address, DNS must not leave"),
        Option("ServerDNSAllowBrokenConfig", "1"),
        Option("ServerDNSDetectHijacking", "0", "no DNS probes of public names"),
        Option("ServerDNSTestAddresses", ""),
    ]


def authority(
    base: list[Option], *, orport: int, dirport: int, resolv_conf: Path,
    voting_interval: int = 10,
) -> list[Option]:
    """A v3 directory authority (also a relay, never an exit) that publishes a consensus every
    ``voting_interval`` seconds after a first one about 5 s after start. Any thread (pure)."""
    return [
        *base,
        Option("ORPort", f"{LOOPBACK}:{orport}"),
        Option("DirPort", f"{LOOPBACK}:{dirport}"),
        Option("Address", LOOPBACK),
        Option("AddressDisableIPv6", "1"),
        Option("SocksPort", "0"),
        Option("ContactInfo", "tornet-authority@localhost"),
        Option("AuthoritativeDirectory", "1"),
        Option("V3AuthoritativeDirectory", "1"),
        Option("AssumeReachable", "1", "do not wait for a reachability self-test"),
        Option("AuthDirMaxServersPerAddr", "0",
               "every relay here is 127.0.0.1: no limit of relays per address (default 2)"),
        Option("TestingV3AuthInitialVotingInterval", "5",
               "the first consensus about 5 s after start (test-network default 150 s)"),
        Option("TestingV3AuthInitialVoteDelay", "2"),
        Option("TestingV3AuthInitialDistDelay", "2"),
        Option("V3AuthVotingInterval", str(voting_interval),
               "then a new consensus every few seconds, so a relay started later joins soon"),
        Option("V3AuthVoteDelay", "2"),
        Option("V3AuthDistDelay", "2"),
        Option("V3AuthNIntervalsValid", "2"),
        Option("TestingDirAuthVoteExit", "*", "Exit flag for every relay, no uptime needed"),
        Option("TestingDirAuthVoteGuard", "*", "Guard flag for every relay, no stability needed"),
        Option("TestingMinExitFlagThreshold", "0", "Exit flag without a bandwidth minimum"),
        Option("ExitRelay", "0"),
        Option("ExitPolicy", "reject *:*"),
        *_dns_for_relays(resolv_conf),
    ]


def relay(
    base: list[Option], *, orport: int, resolv_conf: Path, exit_policy: str | None,
    bridge: bool = False,
) -> list[Option]:
    """A relay on 127.0.0.1:``orport``; an exit when ``exit_policy`` accepts something (give
    the whole policy, e.g. ``"accept 127.0.0.1:5000, reject *:*"``; None: no exit); a bridge
    (not in the consensus, serves its own descriptor to bridge clients) when ``bridge``. Any
    thread (pure)."""
    options = [
        *base,
        Option("ORPort", f"{LOOPBACK}:{orport}"),
        Option("Address", LOOPBACK),
        Option("AddressDisableIPv6", "1"),
        Option("SocksPort", "0"),
        Option("ContactInfo", "tornet-relay@localhost"),
        Option("AssumeReachable", "1", "publish at once, without an ORPort self-test"),
        *_dns_for_relays(resolv_conf),
    ]
    if exit_policy is not None and "accept" in exit_policy:
        options += [
            Option("ExitRelay", "1"),
            Option("ExitPolicyRejectPrivate", "0", "the echo service is on 127.0.0.1"),
            Option("ExitPolicy", exit_policy),
        ]
    else:
        options += [Option("ExitRelay", "0"), Option("ExitPolicy", exit_policy or "reject *:*")]
    if bridge:
        options += [
            Option("BridgeRelay", "1"),
            Option("PublishServerDescriptor", "0",
                   "no bridge authority here: a bridge client asks the bridge itself"),
        ]
    else:
        options.append(Option(
            "DirCache", "0",
            "clients fetch from the authority only: a relay's cache may lack the newest "
            "microdescriptors, and a client asks again only 10 s later"))
    return options


def client(
    base: list[Option], *, socks_port: int, bridges: Sequence[str] = (),
) -> list[Option]:
    """A client with a SOCKS port on 127.0.0.1; with ``bridges`` (``"127.0.0.1:PORT HEX40"``
    values of ``Bridge`` lines) it enters the network only through them. Any thread (pure)."""
    options = [
        *base,
        Option("SocksPort", f"{LOOPBACK}:{socks_port}"),
        Option("ConfluxEnabled", "0",
               "else tor 0.4.9 splits an exit stream over two linked circuits (conflux)"),
        Option("LearnCircuitBuildTimeout", "0",
               "on 2 busy cores a learned timeout is too short; use CircuitBuildTimeout"),
        Option("CircuitBuildTimeout", "60"),
    ]
    if bridges:
        options.append(Option("UseBridges", "1"))
        options.append(Option("TestingBridgeDownloadInitialDelay", "0",
                              "fetch the bridge's descriptor at once (test-network default "
                              "10 s)"))
        options += [Option("Bridge", line) for line in bridges]
    return options
