"""Model, data, checkpoints and outputs on object storage, same code as production: an S3-compatible server
(moto), Google Cloud Storage (fake-gcs-server) and Azure Blob Storage (Azurite), all on loopback."""

from __future__ import annotations

import contextlib
import csv
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import emulators
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from finetune_trainer import storage
from finetune_trainer.checkpoint_store import CheckpointStore
from runs import RunResult, assert_loss_falls
from tiny import job_manifest, prompt_completion_rows


def test_model_data_and_outputs_on_s3(
    s3_endpoint: str,
    s3_env: dict[str, str],
    tiny_model: Path,
    tmp_path: Path,
    finetune_run: Callable[..., RunResult],
) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    for bucket in ("models", "data", "results"):
        s3.create_bucket(Bucket=bucket)
    for f in tiny_model.iterdir():
        s3.upload_file(str(f), "models", f"tiny/{f.name}")
    rows = prompt_completion_rows(300)
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:200]), parquet)
    s3.upload_file(str(parquet), "data", "sft/part-0.parquet")
    csv_file = tmp_path / "train.csv"
    with csv_file.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows[200:])
    s3.upload_file(str(csv_file), "data", "sft/part-1.csv")

    manifest = job_manifest(
        "on-s3",
        tiny_model,
        tmp_path / "unused",
        model={"uri": "s3://models/tiny", "dtype": "fp32"},
        data={"train": {"uri": "s3://data/sft/"}, "format": "promptCompletion", "maxSeqLength": 64},
        output={"uri": "s3://results/on-s3", "save": "both"},
        # The store's endpoint named in the spec, as a user of a non-AWS store writes it: it reaches the
        # model, data and output URIs too (finetune run passes it to the trainer as the pods get it).
        checkpoint={"uri": "s3://results/checkpoints", "endpointUrl": s3_endpoint},
    )
    env = {k: v for k, v in s3_env.items() if not k.startswith("AWS_ENDPOINT_URL")}
    result = finetune_run(manifest, env=env)
    assert_loss_falls(result)
    summary = result.summary()
    assert {a["uri"] for a in summary["artifacts"]} == {"s3://results/on-s3/adapter", "s3://results/on-s3/merged"}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="results")["Contents"] if o["Key"].startswith("on-s3/")}
    assert {"on-s3/manifest.json", "on-s3/adapter/adapter_model.safetensors", "on-s3/merged/model.safetensors"} <= keys
    manifest_body = json.loads(s3.get_object(Bucket="results", Key="on-s3/manifest.json")["Body"].read())
    assert {f["path"] for f in manifest_body["files"]} == {k.removeprefix("on-s3/") for k in keys} - {"manifest.json"}


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_model_data_checkpoints_and_outputs_on_gcs_and_azure(
    scheme: str,
    request: pytest.FixtureRequest,
    tiny_model: Path,
    tmp_path: Path,
    finetune_run: Callable[..., RunResult],
) -> None:
    """gs:// on fake-gcs-server, az:// on Azurite: the model read, the data (Parquet and CSV under one
    prefix) listed and read, checkpoints committed and the output written by one `finetune run`, through
    the filesystems the trainer image ships (gcsfs, adlfs)."""
    emulator: emulators.Emulator = request.getfixturevalue("gcs_emulator" if scheme == "gs" else "azure_emulator")
    prefix = uuid.uuid4().hex[:8]  # the emulators live for the session: buckets of this test only
    models, data, results = (f"{prefix}-{kind}" for kind in ("models", "data", "results"))
    rows = prompt_completion_rows(300)
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:200]), parquet)
    csv_file = tmp_path / "train.csv"
    with csv_file.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows[200:])
    with emulator_env(emulator):
        fs, _ = storage.filesystem(f"{scheme}://{models}")
        for bucket in (models, data, results):
            fs.mkdir(bucket)
        fs.put(f"{tiny_model}/", f"{models}/tiny/", recursive=True)
        fs.put_file(str(parquet), f"{data}/sft/part-0.parquet")
        fs.put_file(str(csv_file), f"{data}/sft/part-1.csv")

    name = f"on-{scheme}"
    output = f"{scheme}://{results}/{name}"
    checkpoint: dict[str, Any] = {"uri": f"{scheme}://{results}/checkpoints", "everySteps": 10}
    if scheme == "gs":
        # The store's endpoint named in the spec, not in the caller's environment: `finetune run` hands it
        # to the trainer as the pods get it (STORAGE_EMULATOR_HOST), for the model, data and output too.
        checkpoint["endpointUrl"] = emulator.url
        run_env = {}
    else:
        run_env = emulator.env  # the connection string, as a pod gets it from spec.checkpoint.credentials
    manifest = job_manifest(
        name,
        tiny_model,
        tmp_path / "unused",
        model={"uri": f"{scheme}://{models}/tiny", "dtype": "fp32"},
        data={"train": {"uri": f"{scheme}://{data}/sft/"}, "format": "promptCompletion", "maxSeqLength": 64},
        output={"uri": output, "save": "both"},
        checkpoint=checkpoint,
    )
    result = finetune_run(manifest, env=run_env)
    assert_loss_falls(result)
    assert {a["uri"] for a in result.summary()["artifacts"]} == {f"{output}/adapter", f"{output}/merged"}

    with emulator_env(emulator):
        fs.invalidate_cache()
        written = {p.removeprefix(f"{results}/{name}/") for p in fs.find(f"{results}/{name}")}
        assert {"manifest.json", "adapter/adapter_model.safetensors", "merged/model.safetensors"} <= written
        listed = json.loads(fs.cat_file(f"{results}/{name}/manifest.json"))
        assert {f["path"] for f in listed["files"]} == written - {"manifest.json"}
        # Checkpoints at steps 10 and 20, each committed (its manifest written last) and complete.
        store = CheckpointStore(f"{scheme}://{results}/checkpoints/local/{name}", config_hash="unused")
        committed = store.committed()
        assert [m.step for m in committed] == [10, 20], store.steps_present()
        assert {"adapter_model.safetensors", "trainer_state.json"} <= {f.path for f in committed[-1].files}


@contextlib.contextmanager
def emulator_env(emulator: emulators.Emulator) -> Iterator[None]:
    """This process's environment pointing at the emulator, for seeding and reading back (the run gets
    only what the test gives it)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in emulator.env.items():
            patch.setenv(key, value)
        yield
