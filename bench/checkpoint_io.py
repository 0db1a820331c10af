"""Checkpoint upload: our checkpoint store's throughput ÷ raw boto3 multipart upload (goal ≥ 0.8).

Both upload the same checkpoint-shaped directory (a large "optimizer" file, a "model" file and a few
small ones) to the same S3-compatible server (moto, in its own process on loopback). Ours is the full
commit protocol: sha256 of every file (in a second thread), streaming multipart upload with bounded
memory, manifest last. boto3 is ``upload_file`` per file with its default TransferConfig (8 MiB parts,
10 threads), nothing else. Trials alternate; medians are reported.

    .venv/bin/python bench/checkpoint_io.py [--mb 512] [--trials 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_checkpoint(root: Path, total_mb: int) -> Path:
    d = root / "checkpoint-100"
    d.mkdir(parents=True)
    big = total_mb * 2**20
    sizes = {"optimizer.pt": big * 2 // 3, "model.safetensors": big // 3 - 6 * 2**10}
    for name, size in sizes.items():
        with (d / name).open("wb") as fh:
            for _ in range(size // 2**20):
                fh.write(os.urandom(2**20))
            fh.write(os.urandom(size % 2**20))
    for name in ("trainer_state.json", "scheduler.pt", "rng_state.pth", "config.json", "training_args.bin"):
        (d / name).write_bytes(os.urandom(1024))
    return d


def wait_for_server(endpoint: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise SystemExit(f"moto server at {endpoint} did not start") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="checkpoint size in MiB")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        wait_for_server(endpoint)
        import boto3
        from finetune_trainer.checkpoint_store import UPLOAD_CHUNK_BYTES, UPLOAD_CONCURRENCY, CheckpointStore

        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        root = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
        local = make_checkpoint(root, args.mb)
        files = sorted(p for p in local.iterdir() if p.is_file())
        nbytes = sum(p.stat().st_size for p in files)

        def clear() -> None:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench"):
                for obj in page.get("Contents", []):
                    s3.delete_object(Bucket="bench", Key=obj["Key"])

        def ours(trial: int) -> float:
            store = CheckpointStore(f"s3://bench/ours/{trial}", config_hash="bench")
            started = time.perf_counter()
            result = store.upload(local, 100, world_size=1)
            elapsed = time.perf_counter() - started
            assert result.manifest is not None and result.bytes == nbytes
            return elapsed

        def raw(trial: int) -> float:
            started = time.perf_counter()
            for p in files:
                s3.upload_file(str(p), "bench", f"raw/{trial}/checkpoint-100/{p.name}")
            return time.perf_counter() - started

        ours(-1)  # warm-up: connections, imports
        raw(-1)
        clear()
        times: dict[str, list[float]] = {"ours": [], "raw": []}
        for trial in range(args.trials):
            order = [("ours", ours), ("raw", raw)] if trial % 2 == 0 else [("raw", raw), ("ours", ours)]
            for name, fn in order:
                times[name].append(fn(trial))
                clear()
        mib = nbytes / 2**20
        ours_tp = mib / statistics.median(times["ours"])
        raw_tp = mib / statistics.median(times["raw"])
        print(f"checkpoint: {len(files)} files, {mib:,.0f} MiB; {args.trials} trials each, medians")
        print(
            f"ours (sha256 + multipart {UPLOAD_CHUNK_BYTES >> 20} MiB x {UPLOAD_CONCURRENCY} + manifest): "
            f"{ours_tp:,.0f} MiB/s  {[round(t, 2) for t in times['ours']]} s"
        )
        print(
            f"raw boto3 upload_file (8 MiB x 10 threads): {raw_tp:,.0f} MiB/s  {[round(t, 2) for t in times['raw']]} s"
        )
        print(f"ratio ours / raw boto3: {ours_tp / raw_tp:.2f} (goal >= 0.8)")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
