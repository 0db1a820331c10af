"""The data pipeline at scale: our check + tokenize ÷ raw batched ``tokenizer(...)`` (goal ≥ 0.8), peak
memory at two dataset sizes (goal: flat, under 1.5 GB at 1M records), and the first-step latency of a
restarted run with the tokenized cache vs without.

1. Throughput: one JSONL of ``--records`` prompt/completion records of about 1 KB each (~1 GB at 1M)
   goes through ``pipeline.check`` and ``pipeline.prepare`` (every record read, checked, tokenized over
   the available cores, written as Arrow and committed to a local checkpoint directory), in a process
   of its own. The baseline, measured in the same run on the same cores, is the tokenizer alone: the
   same prompts and completions, already in memory, through batched ``tokenizer(list)`` calls of 1,000
   (the Rust tokenizer's own threads over every core). Ratio = baseline time / our time (records/s and
   tokens/s ratios are the same number: same records, same tokens).
2. Peak memory of the process running our path, and of its largest tokenizing worker, at each size of
   ``--sizes``: flat means independent of the dataset size. Two figures: peak RSS (``ru_maxrss``), which
   counts the pages of memory-mapped Arrow files the process has read (file-backed, shared with the page
   cache, given back under memory pressure: they grow with the data read, and are not memory the
   process holds), and peak *anonymous* memory (``Pss_Anon`` of /proc/PID/smaps_rollup, sampled every
   50 ms in this process and its tokenizing workers together; proportional, so that the pages a forked
   worker still shares with its parent are counted once): what the process holds and could run out of.
3. First-step latency: ``finetune run`` of a job on ``--latency-records`` records, from its start to its
   first logged step: cold (no cache: check and tokenize), then restarted (its checkpoints deleted, the
   data cache kept: nothing tokenized).

    .venv/bin/python bench/data_pipeline.py [--sizes 100000 1000000] [--latency-records 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, build_model, tiny

CHILD = "--child"


def write_records(path: Path, n: int, seed: int = 0) -> int:
    """``n`` prompt/completion records of about 1 KB each, written as they are made; returns the bytes."""
    rng = random.Random(seed)
    fruits = list(tiny.FRUIT)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            fruit = rng.choice(fruits)
            color, taste = tiny.FRUIT[fruit]
            words = " ".join(rng.choices(tiny.WORDS, k=rng.randint(120, 200)))
            out.write(
                json.dumps(
                    {"prompt": f"tell me about the {fruit}. {words[:300]}", "completion": f" {color} {taste} {words}"}
                )
                + "\n"
            )
    return path.stat().st_size


def _peak_rss() -> tuple[int, int]:
    """Peak RSS (bytes) of this process and of its largest finished child (a tokenizing worker)."""
    import resource

    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    )


class AnonSampler:
    """Samples the proportional anonymous memory (``Pss_Anon``) of this process plus its children every
    ``interval`` seconds in a thread, keeping the peak."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anon(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("Pss_Anon:"):
                        return int(line.split()[1]) * 1024
        except OSError:  # a worker that has just exited
            pass
        return 0

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                children = [c.pid for c in me.children(recursive=True)]
            except psutil.Error:
                children = []
            self.peak = max(self.peak, self._anon(me.pid) + sum(self._anon(pid) for pid in children))
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child_ours(train: Path, model: Path, work: Path) -> dict[str, Any]:
    """Our path, as the preflight runs it: check every record, then tokenize and commit the cache."""
    from finetune_operator.api.trainer_config import JobIdentity, TrainerConfig
    from finetune_operator.api.v1alpha1 import FineTuneJobSpec
    from finetune_trainer.data import pipeline
    from finetune_trainer.distributed import World
    from transformers import AutoTokenizer

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(model)},
            "task": {"type": "sft"},
            "data": {"train": {"uri": str(train)}, "format": "promptCompletion", "maxSeqLength": 512},
            "training": {"maxSteps": 1},
            "metrics": {"enabled": False},
        }
    )
    config = TrainerConfig(
        job=JobIdentity(namespace="bench", name="data"),
        spec=spec,
        checkpoint_dir=str(work / "ckpt"),
        output_dir=str(work / "out"),
        work_dir=str(work / "work"),
    )
    world = World(rank=0, local_rank=0, world_size=1, local_world_size=1)
    tokenizer = AutoTokenizer.from_pretrained(model)
    with AnonSampler() as anon:
        started = time.perf_counter()
        checked = pipeline.check(config, world)
        checked_at = time.perf_counter()
        prepared = pipeline.prepare(config, tokenizer, world=world, checked=checked)
        done = time.perf_counter()
    rss, worker = _peak_rss()
    return {
        "seconds": done - started,
        "check_seconds": checked_at - started,
        "records": prepared.stats.train_records,
        "tokens": int(sum(prepared.train.with_format("arrow")["length"].to_pylist())),
        "rss": rss,
        "worker_rss": worker,
        "anon": anon.peak,
        "cpus": pipeline.available_cpus(),
    }


def child_raw(train: Path, model: Path) -> dict[str, Any]:
    """The baseline: the same texts, in memory, through batched tokenizer calls only (timed)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts, completions = [], []
    with train.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            prompts.append(row["prompt"])
            completions.append(row["completion"])
    tokens = 0
    started = time.perf_counter()
    for first in range(0, len(prompts), 1000):
        a = tokenizer(prompts[first : first + 1000], add_special_tokens=True)["input_ids"]
        b = tokenizer(completions[first : first + 1000], add_special_tokens=False)["input_ids"]
        tokens += sum(map(len, a)) + sum(map(len, b)) + len(b)  # + EOS, as our rows have
    return {"seconds": time.perf_counter() - started, "records": len(prompts), "tokens": tokens}


def in_child(kind: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, CHILD, kind, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), os.environ.get("PYTHONPATH", "")])},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def first_step_seconds(manifest: dict[str, Any], workdir: Path) -> float:
    """Seconds from starting ``finetune run`` to its first logged step (it then runs to the end)."""
    job = workdir.with_suffix(".yaml")
    tiny.write_manifest(job, manifest)
    metrics = workdir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    finetune = Path(sys.executable).with_name("finetune")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(finetune), "run", str(job), "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = None
    while proc.poll() is None:
        if first is None and metrics.exists() and metrics.read_text().strip():
            first = time.perf_counter() - started
        time.sleep(0.05)
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"finetune run failed ({proc.returncode}):\n{output[-4000:]}")
    return first


def gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--latency-records", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    model = build_model(root / "model")
    try:
        for n in args.sizes:
            train = root / f"train-{n}.jsonl"
            size = write_records(train, n)
            raw = in_child("raw", str(train), str(model))
            ours = in_child("ours", str(train), str(model), str(root / f"ours-{n}"))
            assert ours["records"] == raw["records"] == n and ours["tokens"] == raw["tokens"], (ours, raw)
            print(
                f"{n:,} records ({gb(size)}, {raw['tokens']:,} tokens) on {ours['cpus']} cores: "
                f"ours {n / ours['seconds']:,.0f} records/s, {ours['tokens'] / ours['seconds']:,.0f} tokens/s "
                f"(check {ours['check_seconds']:.1f} s of {ours['seconds']:.1f} s); "
                f"raw tokenizer {n / raw['seconds']:,.0f} records/s, {raw['tokens'] / raw['seconds']:,.0f} tokens/s; "
                f"ratio {raw['seconds'] / ours['seconds']:.2f} (goal >= 0.8); "
                f"peak anonymous memory {gb(ours['anon'])} with its workers (goal flat, < 1.5 GB at 1M); "
                f"peak RSS {gb(ours['rss'])} with mapped file pages, largest worker {gb(ours['worker_rss'])}",
                flush=True,
            )
            shutil.rmtree(root / f"ours-{n}", ignore_errors=True)
            train.unlink()

        n = args.latency_records
        train = root / "latency.jsonl"
        write_records(train, n, seed=1)
        manifest = tiny.job_manifest(
            "data-latency",
            model,
            train,
            data={"train": {"uri": str(train)}, "format": "promptCompletion", "maxSeqLength": 512},
            training={"maxSteps": 2, "learningRate": 1e-3, "perDeviceBatchSize": 4, "logEverySteps": 1},
        )
        workdir = root / "latency"
        cold = first_step_seconds(manifest, workdir)
        storage_root = workdir / "storage"
        for checkpoint in storage_root.rglob("checkpoint-*"):
            shutil.rmtree(checkpoint)  # a restart that starts over, its data cache kept
        warm = first_step_seconds(manifest, workdir)
        print(
            f"first step of a run on {n:,} records: {cold:.1f} s without the cache, {warm:.1f} s restarted with it "
            f"({cold - warm:.1f} s of data preparation saved)",
            flush=True,
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == CHILD:
        kind, rest = sys.argv[2], sys.argv[3:]
        result = (
            child_ours(Path(rest[0]), Path(rest[1]), Path(rest[2])) if kind == "ours" else child_raw(*map(Path, rest))
        )
        print(json.dumps(result))
    else:
        main()
