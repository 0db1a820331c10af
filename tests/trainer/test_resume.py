"""Durable checkpoints and exact resume: two CPU ranks under torchrun, checkpoints on S3 (moto on loopback).

An interrupted run, rerun with the same command, continues from the newest committed checkpoint and
ends where an uninterrupted run ends: same steps, same losses (within 1e-4).
"""

from __future__ import annotations

import math
import re
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import live
import tiny
from finetune_trainer.faults import NONFINITE_LOSS_AT_STEP
from runs import RunResult
from tiny import job_manifest

STEPS = 30
RUN_TIMEOUT = 300


def manifest(name: str, tiny_model: Path, train_jsonl: Path, bucket: str, **overrides: Any) -> dict[str, Any]:
    return job_manifest(
        name,
        tiny_model,
        train_jsonl,
        training__maxSteps=STEPS,
        checkpoint={"uri": f"s3://{bucket}/ckpt", "everySteps": 4, "keepLast": 2},
        **overrides,
    )


def assert_resumed_exactly(reference: RunResult, resumed: list[dict[str, Any]], start: int) -> None:
    """The rerun logged exactly steps start+1..STEPS, with the uninterrupted run's losses."""
    losses = live.losses_by_step(resumed)
    assert sorted(losses) == list(range(start + 1, STEPS + 1)), f"rerun trained steps {sorted(losses)}"
    expected = live.losses_by_step(tiny.read_metrics(reference.workdir))
    for step, loss in losses.items():
        assert abs(loss - expected[step]) < 1e-4, f"step {step}: resumed loss {loss} != uninterrupted {expected[step]}"
    assert abs(losses[STEPS] - expected[STEPS]) < 1e-4


def test_kill_one_rank_then_resume_exactly(
    s3_endpoint: str,
    s3_env: dict[str, str],
    tiny_model: Path,
    train_jsonl: Path,
    tmp_path: Path,
    finetune_run: Callable[..., RunResult],
) -> None:
    s3 = live.s3_client(s3_endpoint)
    bucket = f"resume-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)

    reference = finetune_run(manifest("reference", tiny_model, train_jsonl, bucket), "--nproc", "2", env=s3_env)
    assert reference.returncode == 0, reference.output[-5000:]

    job = manifest("victim", tiny_model, train_jsonl, bucket)
    prefix = "ckpt/local/victim"
    run = live.start(tmp_path, job, "--nproc", "2", env=s3_env)
    try:
        ranks = run.ranks(2)
        live.wait_for(
            "a committed checkpoint and training past it",
            lambda: live.committed_steps(s3, bucket, prefix) and run.logged_step() >= 10,
            timeout=180,
        )
        ranks[1].send_signal(signal.SIGKILL)
        code = run.wait(timeout=120)
    finally:
        run.kill()
    assert code == 128 + signal.SIGKILL, f"exit {code}: the kill landed after training ended?\n{run.output[-4000:]}"
    killed_at = run.logged_step()
    assert killed_at < STEPS
    committed = live.committed_steps(s3, bucket, prefix)
    newest = committed[-1]
    assert 4 <= newest <= killed_at and newest % 4 == 0, (committed, killed_at)

    logged_before = len(run.metrics())
    rerun = live.start(tmp_path, job, "--nproc", "2", env=s3_env, tag="rerun")
    code = rerun.wait(timeout=RUN_TIMEOUT)
    assert code == 0, rerun.output[-5000:]
    assert f"resuming from s3://{bucket}/{prefix}/checkpoint-{newest} (step {newest}" in rerun.output
    assert_resumed_exactly(reference, rerun.metrics()[logged_before:], newest)
    # keepLast 2: the newest two (the final step's among them) and nothing else stays committed.
    assert live.committed_steps(s3, bucket, prefix) == [28, 30]

    # Another world size (DDP): uncommit the final checkpoint, resume step 28's with one rank.
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/checkpoint-30/manifest.json")
    logged_before = len(run.metrics())
    alone = live.start(tmp_path, job, "--nproc", "1", env=s3_env, tag="one-rank")
    assert alone.wait(timeout=RUN_TIMEOUT) == 0, alone.output[-5000:]
    assert "written by 2 ranks) with 1 ranks" in alone.output
    assert sorted(live.losses_by_step(alone.metrics()[logged_before:])) == [29, 30]

    # A corrupt committed checkpoint (a file changed, same size): the run falls back to the older one.
    key = f"{prefix}/checkpoint-30/adapter_model.safetensors"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    logged_before = len(alone.metrics())
    healed = live.start(tmp_path, job, "--nproc", "1", env=s3_env, tag="corrupt")
    assert healed.wait(timeout=RUN_TIMEOUT) == 0, healed.output[-5000:]
    assert f"checkpoint-30 (s3://{bucket}/{prefix}/checkpoint-30) is corrupt" in healed.output
    assert f"resuming from s3://{bucket}/{prefix}/checkpoint-28 (step 28" in healed.output
    assert sorted(live.losses_by_step(healed.metrics()[logged_before:])) == [29, 30]
    assert live.committed_steps(s3, bucket, prefix) == [28, 30]


def test_deepspeed_sigterm_then_resume_exactly(
    s3_endpoint: str,
    s3_env: dict[str, str],
    tiny_model: Path,
    train_jsonl: Path,
    tmp_path: Path,
    finetune_run: Callable[..., RunResult],
) -> None:
    s3 = live.s3_client(s3_endpoint)
    bucket = f"zero2-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    zero2 = {"distributed__deepspeed": {"zeroStage": 2}}

    reference = finetune_run(
        manifest("zero2-reference", tiny_model, train_jsonl, bucket, **zero2), "--nproc", "2", env=s3_env
    )
    assert reference.returncode == 0, reference.output[-5000:]

    job = manifest("zero2", tiny_model, train_jsonl, bucket, **zero2)
    job["spec"]["checkpoint"].update(everySteps=100, gracePeriodSeconds=60)  # only the preemption saves
    prefix = "ckpt/local/zero2"
    run = live.start(tmp_path, job, "--nproc", "2", env=s3_env)
    try:
        live.wait_for("training to reach step 6", lambda: run.logged_step() >= 6, timeout=180)
        signalled_at, signalled_step = time.time(), run.logged_step()
        run.launcher().send_signal(signal.SIGTERM)
        code = run.wait(timeout=90)
        exited_at = time.time()
    finally:
        run.kill()
    assert code == 85, f"exit {code}\n{run.output[-4000:]}"
    assert exited_at - signalled_at < 60, "the preemption save exceeded gracePeriodSeconds"
    committed = live.committed_steps(s3, bucket, prefix)
    assert len(committed) == 1 and signalled_step <= committed[0] < STEPS, (committed, signalled_step)
    preempted_step = committed[0]
    body = live.manifest(s3, bucket, prefix, preempted_step)
    assert body["world_size"] == 2 and body["zero_stage"] == 2
    assert any(f["path"].startswith(f"global_step{preempted_step}/") for f in body["files"]), body["files"]
    assert f"preempted at step {preempted_step}: checkpoint-{preempted_step} committed" in run.output

    # Another world size cannot take ZeRO-partitioned optimizer state: a clear refusal, exit 2.
    other = live.start(tmp_path, job, "--nproc", "1", env=s3_env, tag="one-rank")
    assert other.wait(timeout=RUN_TIMEOUT) == 2, other.output[-4000:]
    assert "written by 2 ranks with DeepSpeed ZeRO-2" in other.output

    logged_before = len(run.metrics())
    rerun = live.start(tmp_path, job, "--nproc", "2", env=s3_env, tag="rerun")
    code = rerun.wait(timeout=RUN_TIMEOUT)
    assert code == 0, rerun.output[-5000:]
    assert_resumed_exactly(reference, rerun.metrics()[logged_before:], preempted_step)


def test_nonfinite_loss_stops_with_exit_4_and_keeps_the_last_good_checkpoint(
    tiny_model: Path, train_jsonl: Path, finetune_run: Callable[..., RunResult]
) -> None:
    # Whether real hyperparameters overflow depends on the machine's floating-point kernels, so the
    # trainer's test hook poisons step 7's loss (and its gradients) with NaN: on every machine alike.
    bad_step = 7
    job = job_manifest(
        "diverges", tiny_model, train_jsonl, training__maxSteps=20, checkpoint={"everySteps": 2, "keepLast": 2}
    )
    result = finetune_run(job, env={NONFINITE_LOSS_AT_STEP: str(bad_step)})
    assert result.returncode == 4, result.output[-5000:]
    match = re.search(r"training loss became (nan|inf|-inf) at step (\d+); stopped without saving it", result.output)
    assert match, result.output[-3000:]
    bad = int(match.group(2))
    assert bad == bad_step, result.output[-3000:]
    # Every logged step before it was finite; the bad step was neither logged nor saved.
    losses = live.losses_by_step(tiny.read_metrics(result.workdir))
    assert sorted(losses) == list(range(1, bad)) and all(math.isfinite(v) for v in losses.values())
    store = result.workdir / "storage" / "local" / "diverges"
    kept = sorted(int(p.parent.name.removeprefix("checkpoint-")) for p in store.glob("checkpoint-*/manifest.json"))
    assert kept == [4, 6], (kept, bad)
    assert f"the last good checkpoint is {store}/checkpoint-{kept[-1]}" in result.output
