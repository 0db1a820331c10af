"""`finetune sweep` on the tiny model: 8 trials over the learning rate, chosen by TPE, a trial the median
pruner stops really stopped early (its process ended at an evaluation, recorded Pruned), the table and
the best, and the trials exported as an Optuna study. (The determinism of the parameters is proven
cheaply on simulated trials in tests/unit/test_sweep_logic.py.)"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import tiny
import yaml

FINETUNE = Path(sys.executable).with_name("finetune")
MAX_STEPS = 100
EVERY = 20


def test_a_sweep_over_the_learning_rate(tiny_model: Path, tmp_path: Path) -> None:
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(200))
    tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.prompt_completion_rows(32, seed=1))
    template = tiny.job_manifest(
        "t",
        tiny_model,
        train,
        training__maxSteps=MAX_STEPS,
        training__gradientAccumulationSteps=2,
        training__logEverySteps=10,
        training__evaluation={"everySteps": EVERY},
    )["spec"]
    template["data"]["eval"] = {"uri": "eval.jsonl"}  # relative: to the sweep's manifest
    template["checkpoint"] = {"everySteps": 1000}
    sweep = {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "lr"},
        "spec": {
            "template": template,
            "searchSpace": [{"path": "training.learningRate", "type": "float", "low": 1e-5, "high": 3e-2, "log": True}],
            "objective": {"metric": "loss", "direction": "minimize"},
            "maxTrials": 8,
            "sampler": {"type": "tpe", "seed": 1, "startupTrials": 4},
            "pruning": {"type": "median", "startupTrials": 2},
        },
    }
    manifest = tmp_path / "sweep.yaml"
    manifest.write_text(yaml.safe_dump(sweep, sort_keys=False), encoding="utf-8")
    workdir, study_file = tmp_path / "runs", tmp_path / "study.db"
    proc = subprocess.run(
        [str(FINETUNE), "sweep", str(manifest), "--workdir", str(workdir), "--export-study", str(study_file)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    print(proc.stderr[-3000:], proc.stdout)
    trials = [json.loads((workdir / f"lr-{n}" / "trial.json").read_text()) for n in range(8)]
    assert not (workdir / "lr-8").exists()
    complete = [t for t in trials if t["state"] == "Complete"]
    pruned = [t for t in trials if t["state"] == "Pruned"]
    assert len(complete) >= 4 and pruned, trials

    # Each complete trial's value is its run's final eval loss; the best is below the median trial's.
    for t in complete:
        summary = json.loads((workdir / f"lr-{t['number']}" / "summary.json").read_text())
        assert t["value"] == summary["after"]["eval_loss"]
        assert summary["steps"] == MAX_STEPS
    values = [t["value"] for t in complete]
    best = min(complete, key=lambda t: t["value"])
    assert best["value"] < statistics.median(values), values
    assert f"best: lr-{best['number']} loss {best['value']:.6g}" in proc.stdout

    # A pruned trial stopped at an evaluation: its process ended there (no final summary, no later step),
    # its eval loss there worse than the median of the complete trials' at that step.
    for t in pruned:
        run = workdir / f"lr-{t['number']}"
        steps = [m["step"] for m in tiny.read_metrics(run)]
        last_eval = max(int(s) for s in t["intermediate"])
        assert not (run / "summary.json").exists()
        assert max(steps) < MAX_STEPS, steps
        earlier = [c for c in complete if c["number"] < t["number"]]
        at_step = [c["intermediate"][str(last_eval)] for c in earlier]
        assert t["intermediate"][str(last_eval)] > statistics.median(at_step), (t, at_step)
        assert f"lr-{t['number']}: pruned at step {last_eval}" in proc.stderr

    # The table, and the study for optuna-dashboard.
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["TRIAL", "STATE", "training.learningRate", "LOSS", "EVALS"]
    assert len(lines) == 1 + 8 + 2 and lines[9].startswith("best: ") and lines[10].startswith(f"study: {study_file}")
    import optuna

    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{study_file}")
    assert len(study.trials) == 8 and study.best_value == best["value"]
    assert [t.state.name for t in study.trials].count("PRUNED") == len(pruned)
