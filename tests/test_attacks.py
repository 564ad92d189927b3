"""``python -m benchmarks.attacks --quick --json``: the report's shape, and the rows whose
outcome does not depend on timing.

The program runs once, as a user would (a child process from the repository root, in a private
network namespace when permitted): ten attacks, each against its own relay processes. Checked:

* every attack of the issue is in the report with ``held`` (a bool), a ``figure`` and a
  ``limit`` that are numbers or dicts of numbers (never bools or strings), the relay's
  configuration, and no error;
* the refusals hold: exit_private (every loopback target refused with tor's END reasons,
  the secret service never connected to, the relay never looped into its own ORPort, a relay
  without an exit policy is no exit), extend_policy (every EXTEND2 refused, nothing dialed),
  relay_early_loop (8 RELAY_EARLY cells accepted, a ring circuit ends at 9 hops, extends to
  itself refused without dialing), bad_created2 (only the bad circuits close);
* the protocol outcomes of the load and memory rows that are counts, not timings: the stalled
  next hop's circuits are closed with RESOURCELIMIT, the sniper's circuit is destroyed, the
  exit keeps a descriptor reserve (streams past it get END RESOURCELIMIT, a new honest link
  is accepted), the circuit flood from one address gets at most the DoS burst plus its
  refill;
* ``--only`` runs just the named rows; an unknown name is refused.

No timing is asserted (the figures are reported, not judged, here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.attacks.run import ATTACKS
from benchmarks.rawpeer import split_cells, var_cell
from relay.cells import CellCommand

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(900)


def run_attacks(*args: str, timeout: float = 800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.attacks", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    done = run_attacks("--quick", "--json")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: object) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and _is_number(v)
                                   for k, v in value.items())
    return _is_number(value)


def test_every_attack_is_reported_with_numbers(report: dict[str, Any]) -> None:
    assert list(report["attacks"]) == list(ATTACKS)
    assert report["quick"] is True and isinstance(report["network"], str)
    for name, row in report["attacks"].items():
        assert "error" not in row, (name, row.get("error"))
        assert isinstance(row["held"], bool), name
        assert _numbers(row["figure"]), (name, row["figure"])
        assert _numbers(row["limit"]), (name, row["limit"])
        if isinstance(row["limit"], dict):  # every limit is held against a measured figure
            assert set(row["limit"]) <= set(row["figure"]), name
        assert row["config"] and row["before"], name


def test_the_exit_refuses_every_loopback_target(report: dict[str, Any]) -> None:
    row = report["attacks"]["exit_private"]
    figure = row["figure"]
    assert figure["refused"] == figure["targets"] >= 8, row
    assert figure["reached"] == figure["secret_connections"] == figure["secret_bytes_read"] == 0
    assert figure["orport_loop_links"] == 0 and figure["non_exit_refused"] == 2
    assert row["held"] is True


def test_extends_to_private_addresses_and_itself_are_refused_undialed(
    report: dict[str, Any]
) -> None:
    row = report["attacks"]["extend_policy"]
    figure = row["figure"]
    assert figure["refused"] == figure["extends"] == 12, row["note"]
    assert figure["relay_dials"] == 0 and figure["silent_port_connections"] == 0
    assert row["held"] is True


def test_relay_early_budget_bounds_a_ring_circuit(report: dict[str, Any]) -> None:
    row = report["attacks"]["relay_early_loop"]
    figure = row["figure"]
    assert figure["relay_early_accepted"] == 8
    assert figure["longest_circuit_hops"] == 9  # CREATE_FAST + 8 extends in RELAY_EARLY
    assert figure["self_extends_refused"] == 2 and figure["self_extend_dials"] == 0
    assert row["held"] is True


def test_a_bad_created2_closes_only_its_circuit(report: dict[str, Any]) -> None:
    row = report["attacks"]["bad_created2"]
    assert row["figure"] == row["limit"] == {
        "bad_circuits_destroyed": 2, "other_circuit_cells_forward": 1,
        "other_circuit_cells_backward": 1, "next_hop_links": 1, "next_hop_links_closed": 0}
    assert row["held"] is True


def test_count_outcomes_of_the_memory_and_flood_rows(report: dict[str, Any]) -> None:
    rows = report["attacks"]
    queue = rows["next_hop_queue"]["figure"]
    assert queue["closed_resourcelimit"] == queue["circuits"] >= 1
    assert rows["sniper"]["figure"]["circuit_destroyed"] == 1
    streams = rows["streams_fds"]["figure"]
    assert streams["honest_link_accepted"] == 1 and streams["relay_fds"] < streams["fd_limit"]
    assert streams["streams_refused_resourcelimit"] > 0
    flood = rows["circuit_flood"]
    assert flood["figure"]["circuits_created"] <= flood["limit"]["circuits_created"]
    assert flood["figure"]["refused_resourcelimit"] == flood["figure"]["circuits_refused"] > 0
    assert rows["create_flood"]["figure"]["dos_defaults_refused"] > 0


def test_only_runs_the_named_attacks() -> None:
    done = run_attacks("--quick", "--json", "--only", "bad_created2", timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(json.loads(done.stdout)["attacks"]) == ["bad_created2"]
    refused = run_attacks("--only", "no_such_attack", timeout=60)
    assert refused.returncode == 2 and "no_such_attack" in refused.stderr


def test_split_cells_reads_fixed_and_variable_cells_and_keeps_the_rest() -> None:
    fixed = (7).to_bytes(4, "big") + bytes((CellCommand.RELAY,)) + bytes(range(256)) * 2
    fixed = fixed[:514]
    padding = var_cell(CellCommand.VPADDING, b"xyz", circ_id=0)
    data = fixed + padding + fixed[:100]
    cells, rest = split_cells(data)
    assert cells == [(7, CellCommand.RELAY, fixed[5:]), (0, CellCommand.VPADDING, b"xyz")]
    assert rest == fixed[:100]
    assert split_cells(padding[:6]) == ([], padding[:6])
