"""The checkpoint store's commit protocol, on S3 (moto on loopback), Google Cloud Storage
(fake-gcs-server on loopback), Azure Blob Storage (Azurite on loopback) and a local filesystem.

A checkpoint counts only once its manifest (written last) is there and every file it lists is present
with its size; downloads verify sha256; keepLast + best rotation; partial uploads (a process killed
mid-upload) are never read and are removed by the next clean-up; a changed spec is refused.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import live
import pytest
from finetune_operator.api.trainer_config import build_trainer_config, checkpoint_hash
from finetune_operator.api.v1alpha1 import FineTuneJob
from finetune_trainer import checkpointing, storage
from finetune_trainer.checkpoint_store import BestMetric, CheckpointError, CheckpointStore
from finetune_trainer.distributed import World
from finetune_trainer.errors import ConfigError
from tiny import job_manifest

SINGLE = World(rank=0, local_rank=0, world_size=1, local_world_size=1)


def fake_checkpoint(root: Path, step: int, size: int = 3000) -> Path:
    """A directory shaped like transformers' checkpoint-<step> (contents derived from the step)."""
    d = root / f"checkpoint-{step}"
    (d / "global_step1").mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(bytes((step + i) % 256 for i in range(size)))
    (d / "optimizer.pt").write_bytes(os.urandom(size * 2))
    (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (d / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"z" * 100)
    return d


@pytest.fixture(params=["s3", "gs", "az", "file"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh checkpoint prefix on each kind of store; the environment points clients at its server
    (as a pod's does), for this process and the uploader it starts."""
    if request.param == "file":
        return str(tmp_path / "store" / "ns" / "job")
    bucket = f"store-{uuid.uuid4().hex[:8]}"
    if request.param == "s3":
        for key, value in request.getfixturevalue("s3_env").items():
            monkeypatch.setenv(key, value)
        live.s3_client(request.getfixturevalue("s3_endpoint")).create_bucket(Bucket=bucket)
    else:
        emulator = request.getfixturevalue("gcs_emulator" if request.param == "gs" else "azure_emulator")
        for key, value in emulator.env.items():
            monkeypatch.setenv(key, value)
        fs, _ = storage.filesystem(f"{request.param}://{bucket}")
        fs.mkdir(bucket)  # a bucket (gs) or container (az)
    return f"{request.param}://{bucket}/ckpt/ns/job"


def test_commit_download_and_verification(store_uri: str, tmp_path: Path) -> None:
    store = CheckpointStore(store_uri, config_hash="h1")
    local = fake_checkpoint(tmp_path / "staging", 10)
    result = store.upload(local, 10, world_size=2, epoch=0.5, zero_stage=2, metrics={"eval_loss": 1.5})
    assert result.manifest is not None
    assert result.bytes == sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    [manifest] = store.committed()
    assert (manifest.step, manifest.world_size, manifest.zero_stage, manifest.config_hash) == (10, 2, 2, "h1")
    assert manifest.metrics == {"eval_loss": 1.5} and manifest.uri == f"{store_uri}/checkpoint-10"
    assert {f.path for f in manifest.files} == {
        "adapter_model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    }

    copy = store.download(manifest, tmp_path / "restore" / "checkpoint-10")
    for f in manifest.files:
        assert (copy / f.path).read_bytes() == (local / f.path).read_bytes()

    # A file replaced by one of the same size: the sha256 check refuses the download.
    corrupt = bytearray((local / "optimizer.pt").read_bytes())
    corrupt[0] ^= 0xFF
    store.fs.pipe_file(f"{store.dir_path(10)}/optimizer.pt", bytes(corrupt))
    with pytest.raises(CheckpointError, match="sha256"):
        store.download(manifest, tmp_path / "again")
    # A file gone (or of another size): the checkpoint no longer counts as committed.
    store.fs.rm_file(f"{store.dir_path(10)}/optimizer.pt")
    assert store.committed() == [] and store.newest() is None


def test_uncommitted_checkpoints_are_never_read_and_get_cleaned(store_uri: str, tmp_path: Path) -> None:
    store = CheckpointStore(store_uri, config_hash="h")
    store.upload(fake_checkpoint(tmp_path, 4), 4, world_size=1)
    # checkpoint-8 uploaded but never committed (no manifest), as after a crash mid-upload.
    partial = fake_checkpoint(tmp_path, 8)
    for f in partial.rglob("*"):
        if f.is_file():
            store._put_file(f, f"{store.dir_path(8)}/{f.relative_to(partial).as_posix()}")
    assert store.steps_present() == [4, 8]
    assert [m.step for m in store.committed()] == [4]
    newest = store.newest()
    assert newest is not None and newest.step == 4
    store.upload(fake_checkpoint(tmp_path, 12), 12, world_size=1)
    store.rotate(keep_last=5, best=None)
    assert store.steps_present() == [4, 12], "the stale partial below the newest commit is removed"


def test_keep_last_and_the_best_survives(store_uri: str, tmp_path: Path) -> None:
    store = CheckpointStore(store_uri, config_hash="h")
    losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5, 10: None, 12: 2.2}
    for step, loss in losses.items():
        metrics = {"eval_loss": loss} if loss is not None else {}
        store.upload(fake_checkpoint(tmp_path, step, size=100), step, world_size=1, metrics=metrics)
        store.rotate(keep_last=2, best=BestMetric("eval_loss", greater_is_better=False))
    assert [m.step for m in store.committed()] == [4, 10, 12]
    assert store.steps_present() == [4, 10, 12]
    # Higher is better: step 12 (2.2) is the best and among the newest two; step 4 goes.
    store.rotate(keep_last=2, best=BestMetric("eval_loss", greater_is_better=True))
    assert [m.step for m in store.committed()] == [10, 12]
    store.rotate(keep_last=1, best=None)
    assert [m.step for m in store.committed()] == [12]


def test_nodes_upload_their_own_files_and_node_zero_commits(store_uri: str, tmp_path: Path) -> None:
    store = CheckpointStore(store_uri, config_hash="h")
    node1 = tmp_path / "node1" / "checkpoint-5"
    node1.mkdir(parents=True)
    (node1 / "rng_state_1.pth").write_bytes(b"rank1")
    (node1 / "latest").write_text("global_step5")
    node0 = fake_checkpoint(tmp_path / "node0", 5)
    (node0 / "latest").write_text("global_step5")
    part = store.upload(node1, 5, world_size=2, nodes=2, node_rank=1)
    assert part.manifest is None and store.committed() == []
    result = store.upload(node0, 5, world_size=2, nodes=2, node_rank=0, parts_timeout=10)
    assert result.manifest is not None
    assert {"rng_state_1.pth", "latest", "optimizer.pt"} <= {f.path for f in result.manifest.files}
    assert [m.step for m in store.committed()] == [5]
    with pytest.raises(CheckpointError, match="nodes \\[1\\] did not upload"):
        store.upload(fake_checkpoint(tmp_path / "n0", 6), 6, world_size=2, nodes=2, node_rank=0, parts_timeout=1)


KILLED_UPLOADER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from finetune_trainer import checkpoint_store
    from finetune_trainer.checkpoint_store import CheckpointStore

    uri, local, marker = sys.argv[1:4]
    put = CheckpointStore._put_file
    calls = []

    def put_then_hang(self, path, remote):
        put(self, path, remote)
        calls.append(path)
        if len(calls) == 2:  # half-way through: tell the test, then wait for SIGKILL
            Path(marker).write_text("uploading")
            time.sleep(600)

    CheckpointStore._put_file = put_then_hang
    CheckpointStore(uri, config_hash="h").upload(Path(local), 20, world_size=1)
    """
)


def test_process_killed_during_upload_leaves_a_partial_that_is_ignored_then_removed(
    store_uri: str, tmp_path: Path
) -> None:
    store = CheckpointStore(store_uri, config_hash="h")
    store.upload(fake_checkpoint(tmp_path, 10), 10, world_size=1)
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_UPLOADER, store_uri, str(fake_checkpoint(tmp_path, 20)), str(marker)],
        env=dict(os.environ),
    )
    try:
        live.wait_for("the upload to be half-way", marker.exists, timeout=60)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.steps_present() == [10, 20]
    newest = store.newest()
    assert newest is not None and newest.step == 10, "the partial checkpoint-20 must never be read"
    assert store.clean_partial() == [20]
    assert store.steps_present() == [10]


def test_resume_plan_refuses_another_spec_and_never_starts_over(tmp_path: Path) -> None:
    job = FineTuneJob.model_validate(job_manifest("plan", tmp_path / "m", tmp_path / "t.jsonl"))
    config = build_trainer_config(job, namespace="ns", default_storage=str(tmp_path / "storage"), work_dir=tmp_path)
    assert config.checkpoint_dir is not None
    store = CheckpointStore(config.checkpoint_dir, config_hash="another-spec")
    store.upload(fake_checkpoint(tmp_path / "s", 3), 3, world_size=1)
    store.upload(fake_checkpoint(tmp_path / "s", 6), 6, world_size=1)
    store.fs.rm_file(f"{store.dir_path(6)}/optimizer.pt")  # checkpoint-6 is partial: the newest is 3
    with pytest.raises(ConfigError, match=r"written by a different spec.*resume: never"):
        checkpointing.plan_resume(config, SINGLE, store, None)
    assert store.steps_present() == [3], "the partial checkpoint was cleaned up before the decision"

    same = CheckpointStore(config.checkpoint_dir, config_hash=checkpoint_hash(config.spec))
    same.upload(fake_checkpoint(tmp_path / "s", 9), 9, world_size=1)
    plan = checkpointing.plan_resume(config, SINGLE, same, None)
    assert plan.manifest is not None and plan.manifest.step == 9

    job.spec.checkpoint.resume = "never"
    never = build_trainer_config(job, namespace="ns", default_storage=str(tmp_path / "storage"), work_dir=tmp_path)
    plan = checkpointing.plan_resume(never, SINGLE, same, None)
    assert plan.manifest is None and same.steps_present() == []


def corrupt_file(store: CheckpointStore, step: int, path: str = "adapter_model.safetensors") -> None:
    """Flip a byte of one file: same size, so only the sha256 in the manifest can tell."""
    remote = f"{store.dir_path(step)}/{path}"
    data = bytearray(store.fs.cat_file(remote))
    data[0] ^= 0xFF
    store.fs.pipe_file(remote, bytes(data))
    store.fs.invalidate_cache()


def test_resume_falls_back_past_corrupt_checkpoints(
    store_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = FineTuneJob.model_validate(
        job_manifest(
            "fallback",
            tmp_path / "m",
            tmp_path / "t.jsonl",
            data__evalSplit=0.1,
            training__evaluation={"everySteps": 3},
        )
    )
    config = build_trainer_config(job, namespace="ns", default_storage=str(tmp_path / "storage"), work_dir=tmp_path)
    store = CheckpointStore(store_uri, config_hash=checkpoint_hash(config.spec))
    for step, eval_loss in ((3, 1.0), (6, 2.0), (9, 1.5), (12, 0.5)):
        store.upload(fake_checkpoint(tmp_path / "s", step), step, world_size=1, metrics={"eval_loss": eval_loss})
    corrupt_file(store, 12)  # the newest
    corrupt_file(store, 3, "optimizer.pt")  # the best of those before the resume point
    plan = checkpointing.plan_resume(config, SINGLE, store, None)
    assert plan.manifest is not None and plan.manifest.step == 12 and plan.best is not None and plan.best.step == 12
    staging = tmp_path / "hf-checkpoints"
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.checkpointing"):
        resume_dir = checkpointing.fetch(plan, store, staging, SINGLE)

    # Resumed from the newest checkpoint that verifies; the best is the best one up to it that verifies.
    assert resume_dir == str(staging / "checkpoint-9")
    assert plan.manifest.step == 9 and plan.best is not None and plan.best.step == 9
    assert [m.step for m in plan.kept or []] == [6, 9]
    assert (staging / "checkpoint-9" / "optimizer.pt").read_bytes() == (
        tmp_path / "s" / "checkpoint-9" / "optimizer.pt"
    ).read_bytes()
    assert sorted(p.name for p in staging.iterdir()) == ["checkpoint-9"], "no corrupt download stays staged"
    state = json.loads((staging / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(staging / "checkpoint-9")
    # Each corrupt checkpoint is named in a warning, and uncommitted: its files stay until a clean-up.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for step, path in ((12, "adapter_model.safetensors"), (3, "optimizer.pt")):
        assert any(f"checkpoint-{step} ({store.dir_uri(step)}) is corrupt" in w and path in w for w in warnings), (
            warnings
        )
    assert [m.step for m in store.committed()] == [6, 9]
    assert store.steps_present() == [3, 6, 9, 12]
    assert checkpointing.plan_resume(config, SINGLE, store, None).manifest.step == 9  # type: ignore[union-attr]
    assert store.steps_present() == [6, 9], "the next decision cleans the uncommitted ones up"

    # Nothing verifies: the attempt fails naming them (and the next one starts from the beginning).
    # (A new pod: a staged file that matches its manifest's sha256 would be used, not downloaded again.)
    corrupt_file(store, 6)
    corrupt_file(store, 9)
    plan = checkpointing.plan_resume(config, SINGLE, store, None)
    with pytest.raises(CheckpointError, match=r"no committed checkpoint .* verifies.*checkpoint-9, .*checkpoint-6"):
        checkpointing.fetch(plan, store, tmp_path / "new-pod", SINGLE)
    assert store.committed() == []


def test_config_hash_covers_what_defines_the_training_only(tmp_path: Path) -> None:
    base = FineTuneJob.model_validate(job_manifest("h", tmp_path / "m", tmp_path / "t.jsonl")).spec
    same = base.model_copy(deep=True)
    same.run_policy.suspend = True  # suspend/resume, new resources, outputs, metrics or cadence: same hash
    same.resources.cpu = "8"
    same.metrics.port = 9999
    same.checkpoint.every_minutes = 5
    same.checkpoint.resume = "never"
    assert checkpoint_hash(same) == checkpoint_hash(base)
    other = base.model_copy(deep=True)
    other.training.learning_rate = 1e-5
    assert checkpoint_hash(other) != checkpoint_hash(base)
