"""``finetune run``: train a FineTuneJob on this machine, under torchrun, as its pods would, after the
preflight its operator would run first (``finetune plan`` runs the preflight alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .api.memory import fits_total, memory_breakdown
from .api.trainer_config import (
    EXIT_ROLLBACK,
    build_trainer_config,
    preflight_command,
    storage_environment,
    trainer_command,
)
from .api.v1alpha1 import MODEL_ARTIFACT_KINDS, Dependency, FineTuneJob, FineTuneJobSpec, PreflightResult
from .plan import summary_line

LOCAL_NAMESPACE = "local"


def default_nproc(job: FineTuneJob) -> int:
    """Processes for a local run: procsPerNode, or the visible GPUs (`auto`), or 1 on CPU."""
    procs = job.spec.distributed.procs_per_node
    if procs != "auto":
        return int(procs)
    try:
        import torch
    except ImportError:
        return 1
    return max(torch.cuda.device_count(), 1) if job.spec.resources.gpus_per_node else 1


class LocalDependencyError(ValueError):
    """An ``ftj://`` model with no earlier local run to take it from."""


def local_dependencies(job: FineTuneJob, workdir: Path) -> list[Dependency]:
    """The spec's ``ftj://NAME`` models, resolved against earlier local runs: the merged model of the
    run of NAME beside this one (``<workdir>/../NAME``, where ``finetune run`` puts it by default), from
    its summary.json, as the operator resolves them from the job's status.artifacts."""
    found = []
    runs = workdir.resolve().parent
    for field, name in sorted(job.spec.job_references().items()):
        summary = runs / name / "summary.json"
        if not summary.is_file():
            raise LocalDependencyError(
                f"{field}: ftj://{name}: no earlier local run of FineTuneJob {name} ({summary} does not exist): "
                f"run its manifest first with finetune run (its default --workdir, {runs / name})"
            )
        artifacts = json.loads(summary.read_text(encoding="utf-8")).get("artifacts") or []
        merged = next((a for a in artifacts if a.get("kind") in MODEL_ARTIFACT_KINDS), None)
        if merged is None:
            raise LocalDependencyError(
                f"{field}: ftj://{name}: the run in {runs / name} wrote no merged model (its spec.output.save must "
                "be merged or both, or its method full)"
            )
        found.append(Dependency(field=field, job=name, uri=merged["uri"], sha256=merged["sha256"]))
    return found


def write_trainer_config(job: FineTuneJob, *, manifest: Path, workdir: Path) -> Path:
    """The job's trainer config, as the operator renders it, written to ``workdir/trainer-config.json``:
    relative data paths resolve against the manifest's directory, checkpoints and outputs default to
    ``workdir/storage``, ``ftj://`` models to earlier local runs (:func:`local_dependencies`)."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = build_trainer_config(
        job,
        namespace=LOCAL_NAMESPACE,
        base_dir=manifest.resolve().parent,
        default_storage=str(workdir / "storage"),
        work_dir=workdir,
        dependencies=local_dependencies(job, workdir),
    )
    config_path = workdir / "trainer-config.json"
    config_path.write_text(config.dumps(), encoding="utf-8")
    return config_path


def trainer_environment(job: FineTuneJob) -> dict[str, str]:
    """The environment of the trainer (and of the preflight) here: as in the pod, the spec's object
    store (endpoint, region) for every URI on it, not only checkpoints, over the caller's own."""
    env = {**os.environ, **storage_environment(job.spec)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


#: ``finetune run`` and ``finetune plan`` exit with it when the memory estimate of a rank exceeds
#: ``spec.resources.gpuMemory`` (and ``spec.preflight.allowWillNotFit`` is off): a certain OOM, refused
#: before training. Not one of the trainer's codes (0, 2, 3, 4, 85) nor a crash's (1).
EXIT_WILL_NOT_FIT = 5
PREFLIGHT_RESULT_FILE = "preflight.json"


@dataclass(frozen=True)
class LocalPreflight:
    """What the preflight subprocess left: its exit code, its result (None when it crashed before
    writing one) and its standard error when captured."""

    returncode: int
    result: PreflightResult | None
    stderr: str = ""

    def fits(self, spec: FineTuneJobSpec) -> bool | None:
        """Whether the estimate fits ``spec.resources.gpuMemory`` (None: no estimate, or no GPU memory
        declared), by the comparison the operator makes."""
        if self.result is None or self.result.memory is None:
            return None
        return fits_total(self.result.memory.total, spec)


def preflight_local(
    job: FineTuneJob, *, manifest: Path, workdir: Path, world_size: int | None = None, capture: bool = False
) -> LocalPreflight:
    """Run the preflight here as the operator's preflight pod runs it (``preflight_command``, one
    process) with the trainer's environment; its reasons go to standard error (captured with
    ``capture``), its result to ``workdir/preflight.json``."""
    config_path = write_trainer_config(job, manifest=manifest, workdir=workdir)
    result_path = config_path.parent / PREFLIGHT_RESULT_FILE
    result_path.unlink(missing_ok=True)
    command = [*preflight_command(config_path, python=sys.executable), "--result", str(result_path)]
    if world_size is not None:
        command += ["--world-size", str(world_size)]
    proc = subprocess.run(
        command,
        env=trainer_environment(job),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture else None,
        text=True,
        check=False,
    )
    result = None
    if result_path.is_file():
        result = PreflightResult.model_validate_json(result_path.read_text(encoding="utf-8"))
    return LocalPreflight(proc.returncode, result, proc.stderr or "")


def run_local(job: FineTuneJob, *, manifest: Path, workdir: Path, nproc: int | None = None) -> int:
    """Run the preflight (unless ``spec.preflight.mode`` is ``skip``), then torchrun with the trainer
    config in ``workdir``; return the first refusal's exit code or the trainer's."""
    procs = nproc or default_nproc(job)
    spec = job.spec
    if spec.preflight.mode != "skip":
        checked = preflight_local(job, manifest=manifest, workdir=workdir, world_size=procs)
        if checked.returncode != 0:
            return checked.returncode
        if checked.result is not None:
            print(summary_line(checked.result, spec), file=sys.stderr, flush=True)
        if checked.fits(spec) is False and checked.result is not None and checked.result.memory is not None:
            verdict = memory_breakdown(checked.result.memory, spec)
            if not spec.preflight.allow_will_not_fit:
                print(f"{verdict}\nrefused: set spec.preflight.allowWillNotFit to train anyway", file=sys.stderr)
                return EXIT_WILL_NOT_FIT
            print(f"{verdict}\nspec.preflight.allowWillNotFit: training anyway", file=sys.stderr)
    config_path = write_trainer_config(job, manifest=manifest, workdir=workdir)
    command = trainer_command(config_path, nproc_per_node=procs, python=sys.executable)
    while True:
        code = subprocess.run(command, env=trainer_environment(job), check=False).returncode
        if code != EXIT_ROLLBACK:
            return code
        # The loss diverged and spec.training.onDivergence is rollback: as the operator restarts the gang,
        # run again; the trainer resumes before the divergence (it bounds the rollbacks: maxRollbacks).
        print("the loss diverged: rolling back (spec.training.onDivergence rollback)", file=sys.stderr, flush=True)
