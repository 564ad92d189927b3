"""relay.addrpolicy and relay.exitpolicy: tor's policy syntax, matching, descriptor form and the
exit policy tor builds from its options (the same policies are checked against a real tor in
test_exitpolicy_tor.py)."""

from __future__ import annotations

import ipaddress

import pytest

from relay.addrpolicy import (
    PRIVATE_NETS,
    AddrPolicyError,
    is_internal,
    is_public_for_reject,
    parse_policy,
    remove_redundancies,
    summarize,
)
from relay.circuits import END_REASON_CONNECTREFUSED, END_REASON_EXITPOLICY
from relay.exitpolicy import (
    DEFAULT_EXIT_POLICY,
    ExitPolicyConfig,
    build_exit_policy,
    local_interface_addresses,
)

ip = ipaddress.ip_address


def lines(text: str | list[str]) -> list[str]:
    rules, _ = parse_policy(text)
    return [r.line() for r in rules]


def exit_config(*policy: str, **options: bool) -> ExitPolicyConfig:
    return ExitPolicyConfig(exit_policy=policy, exit_relay=True, **options)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ("accept *:80", ["accept *:80", "accept6 *:80"]),
    ("reject *4:*", ["reject *:*"]),
    ("accept *6:443", ["accept6 *:443"]),
    ("accept6 *:22", ["accept6 *:22"]),
    ("accept 1.2.3.4", ["accept 1.2.3.4:*"]),
    ("accept 1.2.3.4/8:80-81", ["accept 1.2.3.4/8:80-81"]),
    ("accept 1.2.3.4/255.255.0.0:80", ["accept 1.2.3.4/16:80"]),
    ("accept 1.2.3.4/32:*", ["accept 1.2.3.4:*"]),
    ("reject [2001:db8::1]/64:25", ["reject6 [2001:db8::1]/64:25"]),
    ("reject6 [2001:db8::]:1-1024", ["reject6 [2001:db8::]:1-1024"]),
    ("accept [::1]", ["accept6 [::1]:*"]),
    ("accept [::ffff:1.2.3.4]/128:80", ["accept6 [::ffff:1.2.3.4]/96:80"]),
    ("accept [::ffff:1.2.3.4]/24:80", ["accept6 [::ffff:1.2.3.4]/120:80"]),
    ("accept *:+80", ["accept *:80", "accept6 *:80"]),
    ("  accept   1.2.3.4:1-65535 ", ["accept 1.2.3.4:*"]),
])
def test_parse_items(text: str, expected: list[str]) -> None:
    assert lines(text) == expected


def test_comma_lists_and_several_lines_keep_order() -> None:
    assert lines(["accept 1.1.1.1:1, reject 2.2.2.2:2,,", "accept 3.3.3.3:3"]) == [
        "accept 1.1.1.1:1", "reject 2.2.2.2:2", "accept 3.3.3.3:3"]


def test_private_expands_to_tors_list_for_both_families() -> None:
    rules, _ = parse_policy("reject private:25")
    assert [(str(r.address), r.bits) for r in rules] == [
        (n.split("/")[0].strip("[]"), int(n.split("/")[1])) for n in PRIVATE_NETS]
    assert all(not r.accept and (r.port_min, r.port_max) == (25, 25) for r in rules)
    assert {r.version for r in rules} == {4, 6}


@pytest.mark.parametrize("text, why", [
    ("accept *:0", "malformed port '0'"),
    ("accept *:0-80", "malformed port '0-80'"),
    ("accept *:80-0", "malformed port '80-0'"),
    ("accept *:65536", "malformed port '65536'"),
    ("accept *:80-", "malformed port '80-'"),
    ("accept *:90-80", "insane port range '90-80'"),
    ("ACCEPT *:80", "expected 'accept' or 'reject'"),
    ("junk", "expected 'accept' or 'reject'"),
    ("accept *: 80", "expected exactly one"),
    ("accept 1.2.3.4 :80", "expected exactly one"),
    ("accept 010.1.1.1:80", "malformed IP '010.1.1.1'"),
    ("accept 1.2.3:80", "malformed IP '1.2.3'"),
    ("accept ::1:80", "malformed IP ''"),
    ("accept [::1:80", "no closing IPv6 bracket"),
    ("accept 1.2.3.4/33", "bad number of mask bits (33)"),
    ("accept [::1]/129", "bad number of mask bits (129)"),
    ("accept 1.2.3.4/255.0.255.0:80", "is not a prefix"),
    ("accept [::ffff:1.2.3.4]/40:80", "bad mask bits 40 for a v4-mapped address"),
    ("reject *4/8:*", "bit prefix with a wildcard address"),
    ("accept [fe80::1%eth0]:80", "scope id"),
    ("accept private", "expected 'private:PORTS'"),
])
def test_malformed_items_name_the_item_and_the_reason(text: str, why: str) -> None:
    with pytest.raises(AddrPolicyError) as caught:
        parse_policy(f"accept 9.9.9.9:9, {text}")
    assert caught.value.item == text.strip()
    assert why in caught.value.why
    assert repr(text.strip()) in str(caught.value)


def test_accept6_with_ipv4_or_private_is_ignored_with_a_warning() -> None:
    rules, warnings = parse_policy("accept6 1.2.3.4:80, reject6 private:*, accept 5.6.7.8:9")
    assert [r.line() for r in rules] == ["accept 5.6.7.8:9"]
    assert len(warnings) == 2
    assert "'accept6 1.2.3.4:80'" in warnings[0] and "private" in warnings[1]


# --------------------------------------------------------------------------- matching


def first_match(policy: str, address: str, port: int) -> bool | None:
    rules, _ = parse_policy(policy)
    for rule in rules:
        if rule.matches(ip(address), port):
            return rule.accept
    return None


@pytest.mark.parametrize("address, port, expected", [
    ("10.1.2.3", 80, True),        # first rule wins over the later reject
    ("10.1.2.3", 81, False),
    ("10.9.9.9", 80, False),
    ("11.0.0.1", 80, True),
    ("11.0.0.1", 443, None),       # nothing matches
    ("2001:db8::5", 22, False),
    ("2001:db9::5", 22, None),
])
def test_first_match_wins(address: str, port: int, expected: bool | None) -> None:
    policy = ("accept 10.1.2.3:80, reject 10.0.0.0/8:*, accept *4:80-81, "
              "reject [2001:db8::]/32:1-1024")
    assert first_match(policy, address, port) is expected


def test_masked_rules_keep_the_address_as_written_and_match_by_prefix() -> None:
    rules, _ = parse_policy("reject 1.2.3.4/8:*")
    assert rules[0].line() == "reject 1.2.3.4/8:*"
    assert rules[0].matches(ip("1.200.0.1"), 5) and not rules[0].matches(ip("2.0.0.1"), 5)


@pytest.mark.parametrize("address, internal, public", [
    ("10.0.0.1", True, False), ("100.64.0.1", True, False), ("100.128.0.1", False, True),
    ("172.31.255.255", True, False), ("172.32.0.1", False, True),
    ("169.254.1.1", True, False), ("192.168.1.1", True, False), ("127.0.0.1", True, False),
    ("0.1.2.3", True, False), ("0.0.0.0", True, False), ("224.0.0.1", False, False),
    ("225.0.0.1", False, True),  # tor only treats 224/8 as multicast
    ("8.8.8.8", False, True), ("::1", True, False), ("::", True, False),
    ("fc00::1", True, False), ("fe80::1", True, False), ("fec0::1", True, False),
    ("ff02::1", False, False), ("2001:db8::1", False, True),
    ("::ffff:10.0.0.1", True, False), ("::ffff:8.8.8.8", False, True),
])
def test_internal_and_public_as_tor_defines_them(address: str, internal: bool,
                                                 public: bool) -> None:
    assert is_internal(ip(address)) is internal
    assert is_public_for_reject(ip(address)) is public


# --------------------------------------------------------------------------- whole policies


def test_redundancy_removal_follows_tors_three_steps() -> None:
    rules, _ = parse_policy(
        "reject 1.2.3.4:80, reject 1.2.3.0/24:*, accept 1.2.3.4:80, reject *4:*, accept 5.5.5.5:*")
    # Step 1 drops everything after *4:*; step 2 the accept (covered by the earlier /24);
    # step 3 the first reject (covered by the /24 reject, nothing between) and then the /24
    # itself (covered by the reject *4:* after it).
    assert [r.line() for r in remove_redundancies(rules)] == ["reject *:*"]
    rules, _ = parse_policy("reject 1.2.3.4:80, accept 1.2.3.0/24:80, reject *4:*")
    assert [r.line() for r in remove_redundancies(rules)] == [
        "reject 1.2.3.4:80", "accept 1.2.3.0/24:80", "reject *:*"]


def test_default_policy_summary_is_tors() -> None:
    rules, _ = parse_policy(DEFAULT_EXIT_POLICY)
    expected = "reject 25,119,135-139,445,563,1214,4661-4666,6346-6429,6699,6881-6999"
    assert summarize(rules, 4) == expected and summarize(rules, 6) == expected
    assert summarize(parse_policy("reject *:*")[0], 4) == "reject 1-65535"
    assert summarize(parse_policy("accept *:*")[0], 4) == "accept 1-65535"
    # Rejecting one /8 does not make a port rejected in a summary; three /8s do.
    few = "reject 8.0.0.0/8:80, accept *:*"
    many = "reject 8.0.0.0/8:80, reject 9.0.0.0/8:80, reject 11.0.0.0/8:80, accept *:*"
    assert summarize(parse_policy(few)[0], 4) == "accept 1-65535"
    assert summarize(parse_policy(many)[0], 4) == "reject 80"
    # Private rejects never count; an accept of one address counts for nothing.
    assert summarize(parse_policy("reject private:*, accept 1.1.1.1:22, accept *:443")[0],
                     4) == "accept 443"


def test_non_exit_is_reject_star_with_exit_relay_auto() -> None:
    policy = build_exit_policy(ExitPolicyConfig())
    assert not policy.is_exit
    assert policy.descriptor_lines() == ["reject *:*"]
    assert policy.ipv6_policy_line() is None
    assert not policy.allows("8.8.8.8", 80)
    # ExitRelay 0 ignores ExitPolicy; auto with an ExitPolicy makes an exit.
    assert not build_exit_policy(ExitPolicyConfig(("accept *:80",), exit_relay=False)).is_exit
    assert build_exit_policy(ExitPolicyConfig(("accept *:80",))).is_exit


def test_exit_relay_1_without_policy_gets_the_default_policy() -> None:
    policy = build_exit_policy(ExitPolicyConfig(exit_relay=True))
    private4 = [f"reject {n}:*" for n in PRIVATE_NETS if not n.startswith("[")]
    default4 = [f"reject *:{p}" for p in ("25", "119", "135-139", "445", "563", "1214",
                                          "4661-4666", "6346-6429", "6699", "6881-6999")]
    assert policy.descriptor_lines() == [*private4, *default4, "accept *:*"]
    assert policy.full_lines()[0] == "reject6 *:*"
    assert policy.allows("8.8.8.8", 80) and not policy.allows("8.8.8.8", 25)
    assert not policy.allows("10.0.0.1", 80) and not policy.allows("2001:db8::1", 80)
    assert policy.check("2001:db8::1", 80).why.endswith("without IPv6Exit configured)")
    assert policy.describe().startswith("exit policy: ")


def test_user_policy_ending_in_a_catch_all_replaces_the_default() -> None:
    policy = build_exit_policy(exit_config("accept *:443", "reject *:*"))
    assert policy.descriptor_lines()[-2:] == ["accept *:443", "reject *:*"]
    assert policy.allows("8.8.8.8", 443) and not policy.allows("8.8.8.8", 80)
    assert policy.summary(4) == "accept 443"


def test_reduced_exit_policy_is_0_4_9s() -> None:
    policy = build_exit_policy(ExitPolicyConfig(reduced_exit_policy=True))
    assert policy.is_exit
    assert policy.allows("8.8.8.8", 18080) and policy.allows("8.8.8.8", 443)
    assert not policy.allows("8.8.8.8", 25) and not policy.allows("8.8.8.8", 18082)


def test_reject_private_also_rejects_published_public_addresses_only() -> None:
    policy = build_exit_policy(exit_config("accept *:*"),
                               published_addresses=["198.51.100.7", "10.0.0.5", "2001:db8::7"])
    assert "reject 198.51.100.7:*" in policy.descriptor_lines()
    assert not policy.allows("198.51.100.7", 443) and policy.allows("198.51.100.8", 443)
    assert all("10.0.0.5" not in line for line in policy.full_lines())
    # The IPv6 one only appears with IPv6Exit (everything IPv6 is rejected anyway without).
    assert all("2001:db8::7" not in line for line in policy.full_lines())
    v6 = build_exit_policy(exit_config("accept *:*", ipv6_exit=True),
                           published_addresses=["2001:db8::7"])
    assert "reject6 [2001:db8::7]:*" in v6.full_lines()
    assert not v6.allows("2001:db8::7", 80) and v6.allows("2001:db8::8", 80)


def test_loopback_target_needs_reject_private_off_as_in_tor() -> None:
    testing = build_exit_policy(exit_config("accept 127.0.0.1:7777", "reject *:*",
                                            exit_policy_reject_private=False))
    assert testing.allows("127.0.0.1", 7777)
    assert not testing.allows("127.0.0.1", 7778) and not testing.allows("127.0.0.2", 7777)
    assert testing.descriptor_lines() == ["accept 127.0.0.1:7777", "reject *:*"]
    default = build_exit_policy(exit_config("accept 127.0.0.1:7777", "reject *:*"))
    assert not default.allows("127.0.0.1", 7777)
    assert default.check("127.0.0.1", 7777).end_reason == END_REASON_EXITPOLICY


def test_reject_local_interfaces_rejects_public_interface_addresses() -> None:
    config = exit_config("accept *:*", exit_policy_reject_private=False,
                         exit_policy_reject_local_interfaces=True, ipv6_exit=True)
    policy = build_exit_policy(
        config, outbound_addresses=["203.0.113.9"], port_addresses=["0.0.0.0"],
        interface_addresses=["192.0.2.2", "127.0.0.1", "fd00::2", "2001:db8::2", "fe80::1"])
    full = policy.full_lines()
    assert full[:3] == ["reject 203.0.113.9:*", "reject 192.0.2.2:*", "reject6 [2001:db8::2]:*"]
    for address in ("203.0.113.9", "192.0.2.2", "2001:db8::2", "::ffff:192.0.2.2"):
        assert not policy.allows(address, 80), address
    assert policy.allows("127.0.0.1", 80)  # private addresses: what reject private is for


def test_interfaces_are_read_from_proc() -> None:
    found = local_interface_addresses()
    assert ip("127.0.0.1") in found
    assert all(isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address)) for a in found)


# --------------------------------------------------------------------------- exit checks


@pytest.mark.parametrize("address, port, allowed", [
    ("8.8.8.8", 443, True),
    ("[2001:db8::1]", 443, True),
    ("::ffff:8.8.8.8", 443, False),          # tor's private [::]/8 covers every mapped form
    ("::ffff:127.0.0.1", 443, False),        # mapped loopback
    ("::ffff:198.51.100.7", 443, False),     # mapped form of our own address
    ("fe80::1%lo", 443, False),              # scoped link-local
    ("fe80::1", 443, False),
    ("0.0.0.0", 443, False),
    ("::", 443, False),
    ("::ffff:0.0.0.0", 443, False),
    ("8.8.8.8", 0, False),
    ("8.8.8.8", 65536, False),
    ("example.com", 443, False),
])
def test_exit_check_sees_through_mapped_and_scoped_forms(address: str, port: int,
                                                         allowed: bool) -> None:
    policy = build_exit_policy(exit_config("accept *:*", ipv6_exit=True),
                               published_addresses=["198.51.100.7"])
    verdict = policy.check(address, port)
    assert verdict.allowed is allowed
    assert verdict.end_reason == (0 if allowed else END_REASON_EXITPOLICY)


def test_mapped_form_of_a_rejected_ipv4_address_is_refused_with_private_off() -> None:
    policy = build_exit_policy(exit_config("reject 127.0.0.1:*", "accept *:*", ipv6_exit=True,
                                           exit_policy_reject_private=False))
    assert policy.allows("::ffff:127.0.0.2", 80)
    assert not policy.allows("::ffff:127.0.0.1", 80)
    assert not policy.allows("127.0.0.1", 80)


def test_known_relay_orports_are_refused_with_connectrefused() -> None:
    policy = build_exit_policy(exit_config("accept *:*", ipv6_exit=True))
    relays = {(ip("203.0.113.5"), 9001), (ip("2001:db8::5"), 443)}
    refused = policy.check("203.0.113.5", 9001, relays)
    assert not refused.allowed and refused.end_reason == END_REASON_CONNECTREFUSED
    assert not policy.check("::ffff:203.0.113.5", 9001, relays).allowed
    assert not policy.check("[2001:db8::5]", 443, relays).allowed
    assert policy.check("203.0.113.5", 9002, relays).allowed
    reentry_ok = build_exit_policy(exit_config("accept *:*", allow_network_reentry=True))
    assert reentry_ok.check("203.0.113.5", 9001, relays).allowed


def test_ipv6_policy_line_only_with_ipv6_exit() -> None:
    v6 = build_exit_policy(exit_config("reject *6:25", "accept *:*", ipv6_exit=True))
    assert v6.ipv6_policy_line() == "ipv6-policy reject 25"
    no_v6_exit = build_exit_policy(exit_config("accept *4:*", "reject *6:*", ipv6_exit=True))
    assert no_v6_exit.ipv6_policy_line() is None
    assert build_exit_policy(exit_config("accept *:*")).ipv6_policy_line() is None


def test_bad_user_policy_raises_with_the_item() -> None:
    with pytest.raises(AddrPolicyError) as caught:
        build_exit_policy(exit_config("accept *:80", "reject 1.2.3.4/99:*"))
    assert caught.value.item == "reject 1.2.3.4/99:*"
