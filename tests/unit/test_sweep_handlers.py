"""The operator's side of a sweep, without a cluster: what it reads of a trial's watch events, what it
carries over from the sweep's status, and the status patch it writes (finetune_operator.sweep_handlers;
tests/e2e/test_e2e_sweep.py drives it on the real control plane)."""

from __future__ import annotations

import copy
from typing import Any

from finetune_operator.api.sweep import FineTuneSweep, FineTuneSweepStatus
from finetune_operator.sweep import decide, status, trial_job
from finetune_operator.sweep_handlers import PRUNE_PATCH, observations, observed_trial, status_patch
from test_sweep_logic import sweep as sweep_spec


def sweep_object() -> FineTuneSweep:
    return FineTuneSweep.parse_manifest(
        {
            "apiVersion": "finetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "metadata": {"name": "s", "namespace": "ml", "uid": "u-1"},
            "spec": sweep_spec(parallelism=2).to_manifest(),
        }
    )


def watched(manifest: dict[str, Any], **status: Any) -> dict[str, Any]:
    """A trial's body as a watch event brings it (the API server's additions included), as indexed."""
    body = copy.deepcopy(manifest)
    body["metadata"].update(uid="t-uid", resourceVersion="7", managedFields=[{"manager": "x"}])
    body["status"] = {"observedGeneration": 1, **status}
    return observed_trial(body)


def test_trials_are_read_from_their_watch_records_and_the_status_carries_what_the_watch_lacks() -> None:
    sweep = sweep_object()
    first, second = decide("s", sweep.spec, []).create
    running = watched(trial_job(sweep, first), phase="Running", progress={"step": 25, "evalLoss": 2.5})
    assert set(running["metadata"]["annotations"]) == {"finetune.io/sweep-params"}
    assert "spec" not in running and "managedFields" not in running["metadata"]

    trials, unseen = observations(sweep, [running], FineTuneSweepStatus())
    assert [(t.number, t.state, t.intermediate) for t in trials] == [(0, "Running", {25: 2.5})] and unseen == []

    # The status of the reconcile that created both says trial 1 is running; the watch shows only trial 0
    # (1 not seen yet, or deleted): 1 is kept as running and named to be created again (by name: at most once).
    previous = decide("s", sweep.spec, trials).status
    assert [t.number for t in previous.trials] == [0, 1]
    trials, unseen = observations(sweep, [running], previous)
    assert [(t.number, t.state) for t in trials] == [(0, "Running"), (1, "Running")] and unseen == [1]
    assert trials[1].params == second.params
    assert decide("s", sweep.spec, trials).create == []  # parallelism 2 is taken: nothing new

    # A finished trial deleted since: its outcome stays known (only the sweep's status holds it now).
    done = watched(trial_job(sweep, first), phase="Succeeded", progress={"step": 100, "evalLoss": 1.5})
    finished = status("s", sweep.spec, observations(sweep, [done], FineTuneSweepStatus())[0])
    trials, unseen = observations(sweep, [], finished)
    assert [(t.number, t.state, t.value) for t in trials] == [(0, "Complete", 1.5)] and unseen == []

    # Marked pruned: pruned, whatever its phase.
    marked = trial_job(sweep, first)
    marked["metadata"]["annotations"].update(PRUNE_PATCH["metadata"]["annotations"])
    trials, _ = observations(sweep, [watched(marked, phase="Suspended")], FineTuneSweepStatus())
    assert trials[0].state == "Pruned"


def test_the_status_patch_writes_only_changes_and_nulls_what_is_gone() -> None:
    sweep = sweep_object()
    decision = decide("s", sweep.spec, [])
    stored = decision.status.to_manifest()
    assert status_patch(stored, decision.status) is None
    later = decision.status.model_copy(update={"best_trial": "s-0", "best_value": 1.5})
    assert status_patch(stored, later) == {**stored, "bestTrial": "s-0", "bestValue": 1.5}
    # A best trial deleted and forgotten, say: the stored fields are nulled (merge patch), not left behind.
    assert status_patch({**stored, "bestTrial": "s-0", "bestValue": 1.5}, decision.status) == {
        **stored,
        "bestTrial": None,
        "bestValue": None,
    }
