"""The leader election's decisions (finetune_operator.leader.decide), without a cluster; the protocol
against a real API server, with two operator processes and a killed leader, is tests/e2e/test_e2e_failover.py."""

from __future__ import annotations

from typing import Any

from finetune_operator.leader import Observation, Timing, decide

T = Timing(lease_duration=15, renew_deadline=10, retry_period=2)


def lease(holder: str, renew: str = "2026-12-03T10:00:00.000000Z", transitions: int = 0, duration: int = 15) -> Any:
    return {
        "metadata": {"name": "op", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": holder,
            "renewTime": renew,
            "leaseTransitions": transitions,
            "leaseDurationSeconds": duration,
        },
    }


def test_no_lease_is_created_and_ones_own_is_renewed() -> None:
    assert decide(None, "a", Observation(), 0.0, T) == "create"
    assert decide(lease("a"), "a", Observation(), 0.0, T) == "renew"


def test_a_live_leader_is_waited_for_and_a_silent_one_taken_over_by_the_candidates_own_clock() -> None:
    seen = Observation()
    # First sight of b's record: the candidate's clock starts now, whatever renewTime says (its wall
    # clock may be skewed against the leader's).
    assert decide(lease("b", renew="2020-01-01T00:00:00.000000Z"), "a", seen, 100.0, T) == "wait"
    assert decide(lease("b", renew="2020-01-01T00:00:00.000000Z"), "a", seen, 114.9, T) == "wait"
    # b renewed: the clock starts again.
    renewed = lease("b", renew="2020-01-01T00:00:02.000000Z")
    assert decide(renewed, "a", seen, 114.9, T) == "wait"
    assert decide(renewed, "a", seen, 129.8, T) == "wait"
    # Unchanged for the lease's duration: b is dead (or cut off, and has stopped leading at its renew
    # deadline, 5 s before this).
    assert decide(renewed, "a", seen, 129.9, T) == "take"


def test_the_leases_own_duration_counts_and_a_released_lease_is_taken_at_once() -> None:
    seen = Observation()
    assert decide(lease("b", duration=60), "a", seen, 0.0, T) == "wait"
    assert decide(lease("b", duration=60), "a", seen, 59.0, T) == "wait"
    assert decide(lease("b", duration=60), "a", seen, 60.0, T) == "take"
    assert decide(lease(""), "a", Observation(), 0.0, T) == "take"


def test_a_change_of_holder_is_a_change_of_record() -> None:
    seen = Observation()
    assert decide(lease("b"), "a", seen, 0.0, T) == "wait"
    # c took the lease over from b with the same renewTime string: still a new record.
    assert decide(lease("c", transitions=1), "a", seen, 16.0, T) == "wait"
    assert decide(lease("c", transitions=1), "a", seen, 31.0, T) == "take"
