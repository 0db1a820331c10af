"""``finetune run``: train a FineTuneJob on this machine, under torchrun, as its pods would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .api.trainer_config import build_trainer_config, storage_environment, trainer_command
from .api.v1alpha1 import FineTuneJob

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


def run_local(job: FineTuneJob, *, manifest: Path, workdir: Path, nproc: int | None = None) -> int:
    """Write the trainer config into ``workdir`` and run torchrun; return the trainer's exit code."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = build_trainer_config(
        job,
        namespace=LOCAL_NAMESPACE,
        base_dir=manifest.resolve().parent,
        default_storage=str(workdir / "storage"),
        work_dir=workdir,
    )
    config_path = workdir / "trainer-config.json"
    config_path.write_text(config.dumps(), encoding="utf-8")
    # As in the pod: the spec's object store (endpoint, region) for every URI on it, not only checkpoints.
    env = {**os.environ, **storage_environment(job.spec)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    command = trainer_command(config_path, nproc_per_node=nproc or default_nproc(job), python=sys.executable)
    return subprocess.run(command, env=env, check=False).returncode
