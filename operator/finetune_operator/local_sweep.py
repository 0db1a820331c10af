"""``finetune sweep``: a FineTuneSweep on this machine, trial after trial, by the operator's study logic.

Each trial is a ``finetune run`` of the template with the trial's parameters substituted (in
``WORKDIR/SWEEP-N``; relative data paths resolve against the sweep's manifest). While a trial trains, its
metrics.jsonl is read: each evaluation's objective value is an intermediate value, and when the pruner
says so the trial's process is stopped (SIGTERM to the launcher, which passes it to the ranks) and the
trial recorded Pruned. A finished trial's objective is its summary.json's final evaluation.

What each trial came to is ``WORKDIR/SWEEP-N/trial.json``; the trials are the state, as on a cluster
(:func:`finetune_operator.sweep.decide` rebuilds the study from them), so a sweep stopped midway goes on
where it was when run again (an unfinished trial is trained again from its start).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .api.sweep import METRIC_KEYS, FineTuneSweep, FineTuneSweepStatus
from .api.trainer_config import trainer_command
from .api.v1alpha1 import FineTuneJob, ObjectMeta
from .local_run import default_nproc, preflight_local, trainer_environment, write_trainer_config
from .sweep import NewTrial, Observation, decide, study

TRIAL_FILE = "trial.json"
#: How often a running trial's metrics.jsonl is read (seconds).
POLL_SECONDS = 0.2
#: How long a pruned trial's process has to stop after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 60.0


def read_trial(directory: Path) -> Observation | None:
    path = directory / TRIAL_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    intermediate = {int(k): float(v) for k, v in data.get("intermediate", {}).items()}
    return Observation(data["number"], data["params"], data["state"], data.get("value"), intermediate)


def write_trial(directory: Path, obs: Observation) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    body = {
        "number": obs.number,
        "params": obs.params,
        "state": obs.state,
        "value": obs.value,
        "intermediate": {str(k): v for k, v in sorted(obs.intermediate.items())},
    }
    (directory / TRIAL_FILE).write_text(json.dumps(body, indent=2), encoding="utf-8")


def finished_trials(sweep: FineTuneSweep, workdir: Path) -> list[Observation]:
    """The trials of earlier runs that finished (a trial left running by a stopped sweep starts over)."""
    found = []
    for directory in sorted(workdir.glob(f"{sweep.metadata.name}-*")):
        obs = read_trial(directory)
        if obs is not None and obs.state != "Running":
            found.append(obs)
    return found


def evaluations(workdir: Path, key: str) -> dict[int, float]:
    """The objective at each evaluation after the start (step > 0) in the trial's metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    out: dict[int, float] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        value = record.get(key)
        if isinstance(value, (int, float)) and record.get("step", 0) > 0 and math.isfinite(value):
            out[int(record["step"])] = float(value)
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the launcher (it passes it to the ranks); everything under it killed after the grace."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def run_trial(
    sweep: FineTuneSweep,
    trial: NewTrial,
    done: list[Observation],
    *,
    manifest: Path,
    workdir: Path,
    log: Callable[[str], None],
) -> Observation:
    """Train one trial; stop it when the pruner says so. What it came to (also in its trial.json)."""
    from .sweep import should_prune

    spec = sweep.spec
    key = METRIC_KEYS[spec.objective.metric]
    trial_dir = workdir / trial.name
    job = FineTuneJob(
        api_version="finetune.io/v1alpha1",
        kind="FineTuneJob",
        metadata=ObjectMeta(name=trial.name),
        spec=trial.spec,
    )
    running = Observation(trial.number, trial.params, "Running")
    write_trial(trial_dir, running)
    if trial.spec.preflight.mode != "skip":
        checked = preflight_local(job, manifest=manifest, workdir=trial_dir, world_size=default_nproc(job))
        if checked.returncode != 0:
            failed = Observation(trial.number, trial.params, "Failed")
            write_trial(trial_dir, failed)
            log(f"{trial.name}: the preflight refused it (exit {checked.returncode})")
            return failed
    (trial_dir / "metrics.jsonl").unlink(missing_ok=True)
    config = write_trainer_config(job, manifest=manifest, workdir=trial_dir)
    command = trainer_command(config, nproc_per_node=default_nproc(job), python=sys.executable)
    with (trial_dir / "trial.log").open("wb") as out:
        proc = subprocess.Popen(command, env=trainer_environment(job), stdout=out, stderr=subprocess.STDOUT)
        seen: dict[int, float] = {}
        pruned = False
        while True:
            code = proc.poll()
            now = evaluations(trial_dir, key)
            if now != seen and code is None:
                seen = now
                running = Observation(trial.number, trial.params, "Running", None, dict(seen))
                write_trial(trial_dir, running)
                if should_prune(spec, [*done, running], trial.number):
                    step = max(seen)
                    log(f"{trial.name}: pruned at step {step} ({spec.objective.metric} {seen[step]:.4g})")
                    _stop(proc)
                    pruned = True
                    break
            if code is not None:
                seen = evaluations(trial_dir, key)
                break
            time.sleep(POLL_SECONDS)
    if pruned:
        result = Observation(trial.number, trial.params, "Pruned", None, dict(seen))
    elif proc.returncode != 0:
        log(f"{trial.name}: failed (exit {proc.returncode}; {trial_dir / 'trial.log'})")
        result = Observation(trial.number, trial.params, "Failed", None, dict(seen))
    else:
        value = _final_value(trial_dir, key, seen)
        if value is None:
            log(f"{trial.name}: no {key} in its summary.json or metrics.jsonl")
            result = Observation(trial.number, trial.params, "Failed", None, dict(seen))
        else:
            result = Observation(trial.number, trial.params, "Complete", value, dict(seen))
    write_trial(trial_dir, result)
    return result


def _final_value(trial_dir: Path, key: str, seen: dict[int, float]) -> float | None:
    summary = trial_dir / "summary.json"
    if summary.is_file():
        after = json.loads(summary.read_text(encoding="utf-8")).get("after") or {}
        value = after.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return seen[max(seen)] if seen else None


def run_sweep(
    sweep: FineTuneSweep, *, manifest: Path, workdir: Path, log: Callable[[str], None]
) -> FineTuneSweepStatus:
    """Every trial of the sweep, one at a time (spec.parallelism is 1 here); the final status."""
    spec = sweep.spec.model_copy(update={"parallelism": 1})
    local = sweep.model_copy(update={"spec": spec})
    name = sweep.metadata.name
    workdir.mkdir(parents=True, exist_ok=True)
    trials = finished_trials(sweep, workdir)
    while True:
        decision = decide(name, spec, trials)
        if not decision.create:
            return decision.status
        (trial,) = decision.create
        log(f"{trial.name}: {_params_text(trial.params)}")
        result = run_trial(local, trial, trials, manifest=manifest, workdir=workdir, log=log)
        value = f" {spec.objective.metric} {result.value:.6g}" if result.value is not None else ""
        log(f"{trial.name}: {result.state}{value}")
        trials = [*trials, result]


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def table(sweep: FineTuneSweep, status: FineTuneSweepStatus) -> str:
    """The trials as a table, then the best trial and its parameters."""
    paths = [p.path for p in sweep.spec.search_space]
    metric = sweep.spec.objective.metric
    header = ["TRIAL", "STATE", *paths, metric.upper(), "EVALS"]
    rows = [header]
    for t in status.trials:
        cells = [t.name, t.state]
        for path in paths:
            value = t.params.get(path)
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        cells.append(f"{t.value:.6g}" if t.value is not None else "-")
        cells.append(str(len(t.intermediate)))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if status.best_trial is not None and status.best_value is not None:
        lines.append(f"best: {status.best_trial} {metric} {status.best_value:.6g} ({_params_text(status.best_params)})")
    else:
        lines.append("best: none (no trial completed)")
    return "\n".join(lines)


def export_study(sweep: FineTuneSweep, trials: list[Observation], path: Path) -> None:
    """The sweep's trials as an Optuna RDB (SQLite) study named after the sweep, for optuna-dashboard."""
    import optuna

    path.unlink(missing_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
    study(sweep.spec, trials, storage=storage, study_name=sweep.metadata.name)


def observations(status: FineTuneSweepStatus) -> list[Observation]:
    """The trials of a status, as the study logic takes them."""
    return [
        Observation(t.number, dict(t.params), t.state, t.value, {i.step: i.value for i in t.intermediate})
        for t in status.trials
    ]
