"""Model, data and outputs on object storage (an S3-compatible server on loopback), same code as production."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
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
