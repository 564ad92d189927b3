"""relay.extendpolicy: tor's EXTEND2 checks and the answer for each refusal."""

from __future__ import annotations

import ipaddress
import random

import pytest

from relay.cells import DestroyReason
from relay.extendpolicy import ExtendAction, ExtendConfig, OurRelay, check_extend2
from relay.handshakes import LSTYPE_ED25519_ID, Extend2Body, LinkSpecifier

ip = ipaddress.ip_address
TARGET_ID = bytes(range(1, 21))
TARGET_ED = bytes(range(100, 132))
PREVIOUS_ID = b"\x07" * 20
PREVIOUS_ED = b"\x08" * 32
OURS = OurRelay(rsa_id=b"\x05" * 20, ed_id=b"\x06" * 32,
                or_addresses={(ip("203.0.113.1"), 9001), (ip("2001:db8::1"), 9001)})
NTOR = bytes(84)


def body(*specs: LinkSpecifier, htype: int = 2, hdata: bytes = NTOR) -> bytes:
    return Extend2Body(tuple(specs), htype, hdata).encode()


def check(raw: bytes | Extend2Body, **overrides: object):
    kwargs: dict[str, object] = dict(via_relay_early=True, stream_id=0, already_extended=False,
                                     previous_rsa_id=PREVIOUS_ID, previous_ed_id=PREVIOUS_ED,
                                     ours=OURS, config=ExtendConfig())
    kwargs.update(overrides)
    return check_extend2(raw, **kwargs)  # type: ignore[arg-type]


def good(*extra: LinkSpecifier) -> bytes:
    return body(LinkSpecifier.ipv4("198.51.100.9", 443), LinkSpecifier.legacy_id(TARGET_ID),
                *extra)


def test_a_good_extend2_is_extended_to_its_address() -> None:
    decision = check(good(LinkSpecifier(LSTYPE_ED25519_ID, TARGET_ED)))
    assert decision.action is ExtendAction.EXTEND and decision.reason is None
    assert decision.rsa_id == TARGET_ID and decision.ed_id == TARGET_ED
    assert decision.ipv4 == (ip("198.51.100.9"), 443) and decision.ipv6 is None
    assert decision.choose(random.Random(1)) == (ip("198.51.100.9"), 443)


def test_the_first_address_of_each_family_counts() -> None:
    decision = check(body(LinkSpecifier.ipv4("198.51.100.9", 443),
                          LinkSpecifier.ipv4("198.51.100.10", 444),
                          LinkSpecifier.legacy_id(TARGET_ID)))
    assert decision.ipv4 == (ip("198.51.100.9"), 443)


@pytest.mark.parametrize("overrides, why", [
    ({"stream_id": 3}, "non-zero stream id"),
    ({"via_relay_early": False}, "not in a RELAY_EARLY cell"),
])
def test_dropped_without_closing_the_circuit(overrides: dict, why: str) -> None:
    decision = check(good(), **overrides)
    assert decision.action is ExtendAction.DROP and decision.reason is None
    assert why in decision.why


def test_allow_nonearly_extend_consensus_parameter() -> None:
    decision = check(good(), via_relay_early=False,
                     config=ExtendConfig(allow_nonearly_extend=True))
    assert decision.action is ExtendAction.EXTEND


@pytest.mark.parametrize("raw, overrides, why", [
    (good(), {"already_extended": True}, "already has a next hop"),
    (b"\x01\x00", {}, "cannot parse EXTEND2"),
    (body(LinkSpecifier.ipv4("198.51.100.9", 443)), {}, "without an RSA identity"),
    (body(LinkSpecifier.legacy_id(TARGET_ID)), {}, "without an IPv4 or IPv6"),
    (good(LinkSpecifier.legacy_id(TARGET_ID)), {}, "two RSA identity"),
    (good(LinkSpecifier(LSTYPE_ED25519_ID, TARGET_ED), LinkSpecifier(LSTYPE_ED25519_ID,
                                                                     TARGET_ED)),
     {}, "two Ed25519"),
    (body(LinkSpecifier.ipv4("198.51.100.9", 443), LinkSpecifier.legacy_id(bytes(20))), {},
     "all-zero RSA identity"),
    (good(), {"previous_rsa_id": TARGET_ID}, "back to the previous hop"),
    (good(LinkSpecifier(LSTYPE_ED25519_ID, PREVIOUS_ED)), {}, "previous hop (by Ed25519"),
    (body(LinkSpecifier.ipv4("198.51.100.9", 443), LinkSpecifier.legacy_id(TARGET_ID),
          htype=1, hdata=bytes(20)), {}, "TAP/CREATE_FAST"),
    (body(LinkSpecifier.ipv4("198.51.100.9", 443), LinkSpecifier.legacy_id(TARGET_ID),
          hdata=bytes(83)), {}, "not 84"),
])
def test_protocol_refusals_destroy_with_protocol(raw: bytes, overrides: dict, why: str) -> None:
    decision = check(raw, **overrides)
    assert decision.action is ExtendAction.DESTROY
    assert decision.reason is DestroyReason.PROTOCOL
    assert why in decision.why


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.5",
                                     "169.254.0.1", "100.64.0.1", "0.0.0.0"])
def test_private_ipv4_targets_are_refused_unless_allowed(address: str) -> None:
    raw = body(LinkSpecifier.ipv4(address, 443), LinkSpecifier.legacy_id(TARGET_ID))
    refused = check(raw)
    assert refused.action is ExtendAction.DESTROY and refused.reason is DestroyReason.PROTOCOL
    assert "no usable address" in refused.why
    allowed = check(raw, config=ExtendConfig(extend_allow_private_addresses=True))
    # A zero address is never usable, even with ExtendAllowPrivateAddresses.
    assert (allowed.action is ExtendAction.EXTEND) is (address != "0.0.0.0")


def test_zero_port_is_not_usable() -> None:
    decision = check(body(LinkSpecifier.ipv4("198.51.100.9", 0),
                          LinkSpecifier.legacy_id(TARGET_ID)))
    assert decision.reason is DestroyReason.PROTOCOL and "zero address or port" in decision.why


@pytest.mark.parametrize("address", ["::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::"])
def test_private_ipv6_targets_are_refused(address: str) -> None:
    raw = body(LinkSpecifier.ipv6(address, 443), LinkSpecifier.legacy_id(TARGET_ID))
    decision = check(raw, config=ExtendConfig(can_extend_over_ipv6=True))
    assert decision.reason is DestroyReason.PROTOCOL


def test_a_private_address_is_dropped_when_the_other_family_is_usable() -> None:
    raw = body(LinkSpecifier.ipv4("10.0.0.1", 443), LinkSpecifier.ipv6("2001:db8::9", 443),
               LinkSpecifier.legacy_id(TARGET_ID))
    decision = check(raw, config=ExtendConfig(can_extend_over_ipv6=True))
    assert decision.action is ExtendAction.EXTEND
    assert decision.ipv4 is None and decision.ipv6 == (ip("2001:db8::9"), 443)


def test_ipv6_only_without_ipv6_support_is_connectfailed() -> None:
    raw = body(LinkSpecifier.ipv6("2001:db8::9", 443), LinkSpecifier.legacy_id(TARGET_ID))
    decision = check(raw)
    assert decision.reason is DestroyReason.CONNECTFAILED and "IPv6-only" in decision.why
    assert check(raw, config=ExtendConfig(can_extend_over_ipv6=True)).action \
        is ExtendAction.EXTEND


def test_both_families_pick_ipv6_one_time_in_two() -> None:
    raw = body(LinkSpecifier.ipv4("198.51.100.9", 443), LinkSpecifier.ipv6("2001:db8::9", 443),
               LinkSpecifier.legacy_id(TARGET_ID))
    decision = check(raw, config=ExtendConfig(can_extend_over_ipv6=True))
    rng = random.Random(7)
    picks = [decision.choose(rng)[0].version for _ in range(400)]
    assert set(picks) == {4, 6} and 120 < picks.count(6) < 280
    without_v6 = check(raw)
    assert without_v6.ipv6 is None
    assert {without_v6.choose(rng)[0].version for _ in range(20)} == {4}


@pytest.mark.parametrize("raw, why", [
    (body(LinkSpecifier.ipv4("198.51.100.9", 443), LinkSpecifier.legacy_id(OURS.rsa_id)),
     "our identity"),
    (good(LinkSpecifier(LSTYPE_ED25519_ID, b"\x06" * 32)), "our identity"),
    (body(LinkSpecifier.ipv4("203.0.113.1", 9001), LinkSpecifier.legacy_id(TARGET_ID)),
     "our own ORPort 203.0.113.1:9001"),
])
def test_extending_to_ourselves_is_connectfailed(raw: bytes, why: str) -> None:
    decision = check(raw)
    assert decision.action is ExtendAction.DESTROY
    assert decision.reason is DestroyReason.CONNECTFAILED and why in decision.why


def test_our_address_on_another_port_is_fine() -> None:
    raw = body(LinkSpecifier.ipv4("203.0.113.1", 9002), LinkSpecifier.legacy_id(TARGET_ID))
    assert check(raw).action is ExtendAction.EXTEND


def test_decoded_bodies_are_accepted_too() -> None:
    decoded = Extend2Body.decode(good())
    assert check(decoded).action is ExtendAction.EXTEND
