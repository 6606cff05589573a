"""Shards spread over several Ray nodes (ray.cluster_utils.Cluster: three raylets on this machine).

A cluster needs a Ray of its own, so tests/multinode_run.py (placement, a node removed),
tests/hung_node_run.py (a node that hangs) and tests/vanished_node_run.py (a node whose network
is cut: one node in a network namespace of its own, so root is needed) each run in a separate
process (this session's Ray fixture would be a second Ray in one process) and print their findings.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_for_findings(script: str, *args: str, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no findings (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def findings():
    return run_for_findings("multinode_run.py")


def test_strict_spread_puts_every_shard_on_its_own_node(findings):
    assert findings["nodes"] == 3
    assert len(set(findings["shard_nodes"])) == 3
    assert findings["placement"] == 3                         # STRICT_SPREAD, echoed by GetJob


def test_the_gradient_over_three_nodes_equals_the_single_process_gradient(findings):
    assert findings["max_grad_diff"] == 0.0


def test_an_impossible_placement_is_resource_exhausted(findings):
    code, message = findings["four_strict"]
    assert code == "RESOURCE_EXHAUSTED" and "cannot place 4 shards with placement STRICT_SPREAD" in message
    assert "3 live nodes" in message


def test_a_spread_job_survives_the_removal_of_a_node(findings):
    if findings["removed_node"] not in findings["spread_nodes"]:
        pytest.fail(f"the SPREAD job had no shard on the removed node: {findings}")
    assert findings["spread_after_removal"] == ["UNAVAILABLE", "OK"]          # one retryable status
    assert findings["spread_same_gradient"]                                   # restored to the same state
    assert findings["spread_steps_after"] == [4, 5]
    assert findings["removed_node"] not in findings["spread_nodes_after"]


def test_removing_a_node_under_strict_spread_is_reported_clearly(findings):
    """Three shards, STRICT_SPREAD, and two nodes left: the shard cannot come back."""
    first, second = findings["after_removal"]
    assert first[0] == "UNAVAILABLE" and "could not be recovered" in first[1]
    assert second[0] == "FAILED_PRECONDITION" and "delete it and create it again" in second[1]
    assert "a shard died" in findings["job_error"]
    assert findings["after_removal_seconds"] < 90


@pytest.fixture(scope="module")
def hung():
    return run_for_findings("hung_node_run.py")


def test_a_step_call_over_a_node_that_hangs_recovers_once_ray_declares_the_node_dead(hung):
    """The node's processes stopped (SIGSTOP): the line stays open and silent. The call asks Ray
    about the shards' nodes while it waits, so it recovers within seconds of Ray's verdict
    instead of waiting out its timeout (60 s here, 600 s by default)."""
    assert "raylet" in hung["stopped"] and "ray::ShardActor" in hung["stopped"]
    assert hung["steps"] == [4, 5], hung                    # Step recovered by itself and went on
    assert hung["step_call_seconds"] < hung["call_timeout_s"] / 2, hung
    assert hung["victim"] not in hung["nodes_after"]
    assert hung["same_parameters_as_a_job_never_hung"]


@pytest.fixture(scope="module")
def vanished():
    import os

    import netns
    name = f"gsv{os.getpid() % 100_000}"             # ip's names: at most 15 characters with the "h" or "n"
    try:
        # past the script's own watchdog (270 s) and its backstop (30 s)
        found = run_for_findings("vanished_node_run.py", name, timeout=340)
    finally:
        netns.remove(name)                            # whatever a killed script left behind
    if "skipped" in found:
        pytest.skip(found["skipped"])
    return found


def test_a_step_call_over_a_node_that_vanishes_recovers_with_rays_default_health_checks(vanished):
    """The node's network cut (its end of a veth pair set down): nothing crosses, not even an
    answer to keepalives. The line gives up first (TCP_USER_TIMEOUT, 30 s), Ray declares the node
    dead about a minute after the cut; a replacement sent to the node before that dies with it and
    is started again on a live node (in the runs here it was). The call carries on well within
    its timeout (600 s)."""
    assert "error" not in vanished, vanished
    assert vanished["victim_held_a_shard"], vanished
    assert vanished["steps"] == [4, 5], vanished            # Step recovered by itself and went on
    assert vanished["step_call_seconds"] < 150, vanished
    assert vanished["victim"] not in vanished["nodes_after"]
    assert vanished["same_parameters_as_a_job_never_cut_off"]
