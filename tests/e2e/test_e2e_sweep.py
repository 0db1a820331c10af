"""FineTuneSweeps on the real control plane: the operator runs Optuna studies whose trials are FineTuneJobs.

kwok pods do not train: the test plays each trial's trainer, writing the trial's status.progress the way
the trainer's status reporter does (its latest evaluation) and then letting its pods complete.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import bounds
from test_e2e_operator import manifest, release

if TYPE_CHECKING:
    from conftest import Cluster, Operator

SWEEP_LABEL = "finetune.io/sweep"
PRUNED = "finetune.io/sweep-pruned"
PARAMS = "finetune.io/sweep-params"
#: A sweep event → the operator creates the trial → its gang: job controller, scheduler, kwok.
TRIAL_RUNNING_S = bounds.operator(5)


def sweep(name: str, *, max_trials: int, parallelism: int, **spec: Any) -> dict[str, Any]:
    template = manifest("template", nodes=1)["spec"]
    template["data"]["eval"] = {"uri": "s3://data/eval.jsonl"}
    template["distributed"] = {"nodes": 1, "procsPerNode": 1}
    template["resources"]["gpusPerNode"] = 1
    template["training"]["evaluation"] = {"everySteps": 10}
    return {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "template": template,
            "searchSpace": [{"path": "training.learningRate", "type": "float", "low": 1e-5, "high": 1e-1, "log": True}],
            "objective": {"metric": "loss", "direction": "minimize"},
            "maxTrials": max_trials,
            "parallelism": parallelism,
            "sampler": {"type": "random", "seed": 7},
            **spec,
        },
    }


def trials(cluster: Cluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    """The sweep's trial FineTuneJobs by name."""
    items = cluster.get_json("ftj", "-l", f"{SWEEP_LABEL}={name}", namespace=ns)["items"]
    return {t["metadata"]["name"]: t for t in items}


def unfinished(jobs: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(
        n
        for n, t in jobs.items()
        if (t.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        and t["metadata"].get("annotations", {}).get(PRUNED) != "true"
    )


def report(cluster: Cluster, ns: str, trial: str, step: int, eval_loss: float) -> None:
    """What the trainer's status reporter writes after an evaluation."""
    progress = {"step": step, "totalSteps": 100, "evalLoss": eval_loss}
    cluster.kubectl(
        "patch", "ftj", trial, "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"progress": progress}}),
    )  # fmt: skip


def loss_of(lr: float) -> float:
    """The objective the test's "training" reaches: best at a learning rate of 1e-3."""
    return 1.0 + (math.log10(lr) + 3.0) ** 2


def sweep_status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = cluster.get_json("fts", name, namespace=ns).get("status") or {}
    return status


def test_a_sweep_runs_max_trials_at_most_parallelism_at_once_through_an_operator_restart(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    cluster.apply(sweep("lr", max_trials=5, parallelism=2), namespace=ns)
    finished: dict[str, float] = {}
    seen: list[list[str]] = []  # the unfinished trials at every poll

    def running(want: int) -> dict[str, dict[str, Any]] | None:
        jobs = trials(cluster, ns, "lr")
        seen.append(unfinished(jobs))
        return jobs if len(seen[-1]) == want else None

    restarted = False
    while len(finished) < 5:
        # Two trials run at once, never more; each is finished by the test, one at a time.
        want = min(2, 5 - len(finished))
        jobs = cluster.wait_for(
            f"{want} running trials of sweep lr ({sorted(finished)} done)", lambda w=want: running(w), TRIAL_RUNNING_S
        )
        if len(finished) == 2 and not restarted:
            # Mid-sweep: the operator dies (no clean shutdown) and a new one takes over from the cluster.
            operator.kill()
            operator.start()
            restarted = True
        trial = unfinished(jobs)[0]
        lr = json.loads(jobs[trial]["metadata"]["annotations"][PARAMS])["training.learningRate"]
        assert jobs[trial]["spec"]["training"]["learningRate"] == lr
        cluster.running_pods(ns, f"{trial}-a0", 1)
        report(cluster, ns, trial, 100, loss_of(lr))
        release(cluster, ns, f"{trial}-a0")
        cluster.wait_phase(ns, trial, "Succeeded")
        finished[trial] = loss_of(lr)

    status = cluster.wait_for(
        "sweep lr Succeeded",
        lambda: (s := sweep_status(cluster, ns, "lr")).get("phase") == "Succeeded" and s,
        timeout=bounds.operator(2),
    )
    assert max(len(u) for u in seen) == 2, [u for u in seen if len(u) > 2]
    jobs = trials(cluster, ns, "lr")
    assert sorted(jobs) == [f"lr-{n}" for n in range(5)], "exactly maxTrials trials, none twice"
    for job in jobs.values():
        owner = job["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneSweep", "lr", True)
    best = min(finished, key=lambda n: finished[n])
    assert (status["bestTrial"], status["bestValue"]) == (best, finished[best]), status
    assert status["bestParams"] == json.loads(jobs[best]["metadata"]["annotations"][PARAMS])
    assert (status["trialsDone"], status["trialsRunning"]) == (5, 0)
    assert {t["name"]: t["value"] for t in status["trials"]} == finished
    assert all(t["state"] == "Complete" for t in status["trials"])
    # Random sampling with a seed: five different learning rates.
    assert len({t["params"]["training.learningRate"] for t in status["trials"]}) == 5
    assert best in cluster.kubectl("get", "fts", "lr", "-n", ns)
    metrics = operator.metrics()
    assert f'finetune_operator_sweep_trials{{namespace="{ns}",state="Complete",sweep="lr"}} 5.0' in metrics
    events = cluster.get_json("events", "--field-selector", "involvedObject.name=lr", namespace=ns)["items"]
    assert sum(e["reason"] == "TrialCreated" for e in events) >= 3  # those of the operator after the restart too


def test_a_trial_worse_than_the_median_is_pruned_and_suspended(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(
        sweep("pr", max_trials=4, parallelism=1, pruning={"type": "median", "startupTrials": 2}), namespace=ns
    )

    def recorded(trial: str, step: int) -> bool:
        rows = {t["name"]: t for t in sweep_status(cluster, ns, "pr").get("trials") or []}
        return any(i["step"] == step for i in rows.get(trial, {}).get("intermediate") or [])

    # Two trials finish (the median's startup); their objective at step 10 is 1.0 and 1.2.
    for number, at_10, final in ((0, 1.0, 0.9), (1, 1.2, 1.1)):
        trial = f"pr-{number}"
        cluster.wait_for(f"trial {trial}", lambda t=trial: t in trials(cluster, ns, "pr"), timeout=TRIAL_RUNNING_S)
        cluster.running_pods(ns, f"{trial}-a0", 1)
        report(cluster, ns, trial, 10, at_10)
        cluster.wait_for(
            f"step 10 of {trial} in the sweep's status", lambda t=trial: recorded(t, 10), bounds.OPERATOR_S
        )
        report(cluster, ns, trial, 20, final)
        release(cluster, ns, f"{trial}-a0")
        cluster.wait_phase(ns, trial, "Succeeded")

    # The third is far worse than the median at step 10: stopped, marked, and a fourth takes its place.
    cluster.wait_for("trial pr-2", lambda: "pr-2" in trials(cluster, ns, "pr"), timeout=TRIAL_RUNNING_S)
    cluster.running_pods(ns, "pr-2-a0", 1)
    report(cluster, ns, "pr-2", 10, 5.0)
    pruned = cluster.wait_for(
        "trial pr-2 pruned",
        lambda: (
            (t := trials(cluster, ns, "pr").get("pr-2")) and t["metadata"]["annotations"].get(PRUNED) == "true" and t
        ),
        timeout=bounds.OPERATOR_S,
    )
    assert pruned["spec"]["runPolicy"]["suspend"] is True
    cluster.wait_phase(ns, "pr-2", "Suspended")
    cluster.wait_for("pr-2's gang gone", lambda: not cluster.job_pods(ns, "pr-2-a0"), timeout=bounds.operator(3))
    events = cluster.get_json("events", "--field-selector", "involvedObject.name=pr", namespace=ns)["items"]
    assert any(e["reason"] == "TrialPruned" and "pr-2" in e["message"] for e in events), events

    cluster.wait_for("trial pr-3", lambda: "pr-3" in trials(cluster, ns, "pr"), timeout=TRIAL_RUNNING_S)
    cluster.running_pods(ns, "pr-3-a0", 1)
    report(cluster, ns, "pr-3", 10, 0.95)
    cluster.wait_for("step 10 of pr-3 in the sweep's status", lambda: recorded("pr-3", 10), bounds.OPERATOR_S)
    report(cluster, ns, "pr-3", 20, 0.8)
    release(cluster, ns, "pr-3-a0")
    status = cluster.wait_for(
        "sweep pr Succeeded",
        lambda: (s := sweep_status(cluster, ns, "pr")).get("phase") == "Succeeded" and s,
        timeout=bounds.operator(4),
    )
    states = {t["name"]: t["state"] for t in status["trials"]}
    assert states == {"pr-0": "Complete", "pr-1": "Complete", "pr-2": "Pruned", "pr-3": "Complete"}
    assert (status["bestTrial"], status["bestValue"]) == ("pr-3", 0.8)
    assert sorted(trials(cluster, ns, "pr")) == ["pr-0", "pr-1", "pr-2", "pr-3"]


def test_a_search_path_the_job_spec_lacks_passes_admission_and_is_invalid_naming_the_field(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    bad = sweep("typo", max_trials=2, parallelism=1)
    bad["spec"]["searchSpace"][0]["path"] = "training.learningRat"  # CEL cannot see into the job's schema
    cluster.apply(bad, namespace=ns)
    status = cluster.wait_for(
        "sweep typo Invalid",
        lambda: (s := sweep_status(cluster, ns, "typo")).get("phase") == "Failed" and s,
        timeout=bounds.OPERATOR_S,
    )
    [invalid] = status["conditions"]
    assert (invalid["type"], invalid["status"], invalid["reason"]) == ("Invalid", "True", "InvalidSpec")
    assert "spec.searchSpace[0].path" in invalid["message"] and "did you mean learningRate?" in invalid["message"]
    assert trials(cluster, ns, "typo") == {}, "a trial of an invalid sweep"
