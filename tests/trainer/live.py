"""Drive a `finetune run` that is still going: start it, watch it, signal one of its processes.

Everything is polled with a deadline and a message saying what was awaited; nothing sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tiny
from polling import wait_for as wait_for  # tests call live.wait_for


@dataclass
class LiveRun:
    """A `finetune run` subprocess (its own session, like a container) and its work directory."""

    proc: subprocess.Popen[str]
    workdir: Path
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> list[dict[str, Any]]:
        path = self.workdir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def logged_step(self) -> int:
        return max((int(m["step"]) for m in self.metrics() if "loss" in m), default=0)

    def processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def launcher(self) -> psutil.Process:
        """The torchrun launcher: what a pod runs as its first process."""

        def find() -> psutil.Process | None:
            for p in self.processes():
                if "finetune_trainer.launch" in " ".join(p.cmdline()):
                    return p
            return None

        # The preflight (a process of its own: ~25 s on 2 loaded cores) runs before torchrun starts.
        return wait_for("the torchrun launcher process", find, timeout=180)

    def ranks(self, world_size: int) -> dict[int, psutil.Process]:
        """Global rank -> trainer process, once all ranks are up."""

        def find() -> dict[int, psutil.Process] | None:
            found = {}
            for p in self.processes():
                try:
                    cmd = p.cmdline()
                    if "finetune_trainer" in cmd and "--config" in cmd:
                        found[int(p.environ()["RANK"])] = p
                except (psutil.Error, KeyError):
                    continue
            return found if len(found) == world_size else None

        return wait_for(f"{world_size} trainer ranks", find, timeout=180)  # after the preflight, as above

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"finetune run did not exit within {timeout:.0f}s\n{self.output[-5000:]}") from None

    def kill(self) -> None:
        """Kill the whole session and every process under it (cleanup after a failed test): torchrun
        starts its ranks in sessions of their own, which the session's SIGKILL does not reach, and a
        rank left behind would train on, taking a core from every later test."""
        if self.proc.poll() is None:
            descendants = self.processes()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for p in descendants:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            self.proc.wait(timeout=30)
            psutil.wait_procs(descendants, timeout=30)


def start(
    tmp_path: Path, manifest: dict[str, Any], *extra: str, env: dict[str, str] | None = None, tag: str = ""
) -> LiveRun:
    """Start `finetune run MANIFEST` in the background (same workdir for the same job name)."""
    name = manifest["metadata"]["name"]
    job_file = tiny.write_manifest(tmp_path / f"{name}.yaml", manifest)
    workdir = tmp_path / f"run-{name}"
    log_path = tmp_path / f"{name}{'-' + tag if tag else ''}-{time.monotonic_ns()}.log"
    exe = Path(sys.executable).with_name("finetune")
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(exe), "run", str(job_file), "--workdir", str(workdir), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
    return LiveRun(proc, workdir, log_path)


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def committed_steps(s3: Any, bucket: str, prefix: str) -> list[int]:
    """Steps whose manifest exists under s3://bucket/prefix/ (read with boto3, not our store)."""
    steps = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            parts = obj["Key"][len(prefix) :].strip("/").split("/")
            if len(parts) == 2 and parts[0].startswith("checkpoint-") and parts[1] == "manifest.json":
                steps.append(int(parts[0].removeprefix("checkpoint-")))
    return sorted(steps)


def manifest(s3: Any, bucket: str, prefix: str, step: int) -> dict[str, Any]:
    body = s3.get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/checkpoint-{step}/manifest.json")["Body"].read()
    return dict(json.loads(body))


def losses_by_step(records: list[dict[str, Any]]) -> dict[int, float]:
    return {int(m["step"]): float(m["loss"]) for m in records if "loss" in m}
