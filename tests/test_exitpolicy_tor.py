"""Our exit policies equal the ones a real tor 0.4.9 builds from the same options.

``tests/support_exitpolicy_tor.py`` runs a tor per case inside ``unshare -n`` (a network
namespace with only loopback; tor advertises 198.51.100.7 but never dials it) with the case's
options and reads ``GETINFO exit-policy/full`` (every rule, both families) and
``exit-policy/ipv4`` (the descriptor lines); :func:`relay.exitpolicy.build_exit_policy` must give
the same lines for the same options. The interfaces of that namespace are its loopback only.
Several of these policies also show what tor's redundancy removal does to the private and
own-address rejects (they vanish before a later ``reject *:*``).

Skipped when tor or ``unshare -n`` is missing, unless the ``CI`` environment variable is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.addrpolicy import PRIVATE_NETS
from relay.exitpolicy import DEFAULT_EXIT_POLICY, ExitPolicyConfig, build_exit_policy
from relay.torpeer import find_tor

ROOT = Path(__file__).resolve().parent.parent
ADVERTISED = "198.51.100.7"

pytestmark = pytest.mark.timeout(180)

_TORRC_DEFAULTS = {"ExitPolicyRejectPrivate": "1", "IPv6Exit": "0", "ReducedExitPolicy": "0",
                   "ExitPolicyRejectLocalInterfaces": "0", "ExitRelay": "1"}


def _case(options: dict[str, str], config: ExitPolicyConfig
          ) -> tuple[dict[str, str], ExitPolicyConfig]:
    """tor's options (TestingTorNetwork changes ExitPolicyRejectPrivate's default, so every
    case states it) and our config for the same options."""
    return {**_TORRC_DEFAULTS, **options}, config


CASES = [
    _case({}, ExitPolicyConfig(exit_relay=True)),
    _case({"ExitPolicy": "accept *:80,accept 1.2.3.4/8:443,reject [2001:db8::]/32:*",
           "IPv6Exit": "1"},
          ExitPolicyConfig(("accept *:80,accept 1.2.3.4/8:443,reject [2001:db8::]/32:*",),
                           exit_relay=True, ipv6_exit=True)),
    _case({"ExitPolicy": "accept 127.0.0.1:7777,reject *:*", "ExitPolicyRejectPrivate": "0"},
          ExitPolicyConfig(("accept 127.0.0.1:7777,reject *:*",), exit_relay=True,
                           exit_policy_reject_private=False)),
    _case({"ExitPolicy": "reject 1.2.3.4:80,accept [::ffff:1.2.3.4]/128:80,"
                         "accept6 [2001:db8::1]:22,accept6 5.6.7.8:1,reject *4:*,accept *6:*",
           "IPv6Exit": "1"},
          ExitPolicyConfig(("reject 1.2.3.4:80,accept [::ffff:1.2.3.4]/128:80,"
                            "accept6 [2001:db8::1]:22,accept6 5.6.7.8:1,reject *4:*,"
                            "accept *6:*",), exit_relay=True, ipv6_exit=True)),
    _case({"ExitPolicy": "accept *:*", "IPv6Exit": "1"},
          ExitPolicyConfig(("accept *:*",), exit_relay=True, ipv6_exit=True)),
    _case({"ReducedExitPolicy": "1"},
          ExitPolicyConfig(exit_relay=True, reduced_exit_policy=True)),
    _case({"ExitPolicy": "accept *:443,accept 9.9.9.0/24:*",
           "ExitPolicyRejectLocalInterfaces": "1"},
          ExitPolicyConfig(("accept *:443,accept 9.9.9.0/24:*",), exit_relay=True,
                           exit_policy_reject_local_interfaces=True)),
    _case({"ExitRelay": "0", "ExitPolicy": "accept *:*"},
          ExitPolicyConfig(("accept *:*",), exit_relay=False)),
    _case({"ExitRelay": "auto"}, ExitPolicyConfig()),
]


def _namespace_prefix() -> list[str]:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return []
    prefix = [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return prefix if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def tor_answers() -> dict:
    prefix = _namespace_prefix()
    if find_tor() is None or not prefix:
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: it needs tor and unshare -n")
        pytest.skip("needs tor and unshare -n (a private network namespace)")
    command = [*prefix, sys.executable, str(ROOT / "tests" / "support_exitpolicy_tor.py"),
               json.dumps([options for options, _ in CASES])]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    answers = json.loads(run.stdout) if run.stdout.strip() else {"error": run.stderr}
    assert "error" not in answers, answers["error"]
    return answers


def test_defaults_equal_tors(tor_answers: dict) -> None:
    first = tor_answers["answers"][0]
    assert first["default"] == [DEFAULT_EXIT_POLICY]
    assert first["reject-private/default"] == [",".join(f"reject {n}:*" for n in PRIVATE_NETS)]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_policy_lines_equal_tors(tor_answers: dict, index: int) -> None:
    options, config = CASES[index]
    ours = build_exit_policy(config, published_addresses=[ADVERTISED],
                             port_addresses=["127.0.0.1", ADVERTISED, "127.0.0.1"],
                             interface_addresses=["127.0.0.1", "::1"])
    theirs = tor_answers["answers"][index]
    assert ours.full_lines() == theirs["full"], options
    assert ours.descriptor_lines() == theirs["ipv4"], options
