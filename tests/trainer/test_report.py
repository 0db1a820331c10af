"""`finetune report` on a finished run, laid out as `finetune run` lays it out (the quickstart's shape:
LoRA SFT, evaluation, the general-text forgetting check, a cosine schedule with warm-up).

The plots are opened and must be real pictures (size, pixel variance); every number of the summary is
checked against metrics.jsonl, read here independently. The run writes its output to a loopback S3
server, metrics log included: `finetune report s3://OUTPUT` gives the same summary.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import live
import numpy as np
import tiny
from PIL import Image

PLOTS = ("loss.png", "eval_loss.png", "learning_rate.png", "throughput.png")  # a causal-LM run: no scores


def finetune_report(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("finetune")
    return subprocess.run(
        [str(exe), "report", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


def summary_lines(stdout: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in stdout.splitlines() if ":" in line)}


def test_report_of_a_finished_run(
    finetune_run: Callable[..., Any],
    tiny_model: Path,
    train_jsonl: Path,
    tmp_path: Path,
    s3_endpoint: str,
    s3_env: dict[str, str],
) -> None:
    general = tiny.write_jsonl(tmp_path / "general.jsonl", tiny.text_rows(40, seed=3))
    s3 = live.s3_client(s3_endpoint)
    bucket = f"report-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    job = tiny.job_manifest(
        "reported",
        tiny_model,
        train_jsonl,
        data__evalSplit=0.1,
        training__maxSteps=16,
        training__scheduler="cosine",
        training__warmupSteps=3,
        training__logEverySteps=2,
        training__evaluation={"everySteps": 8},
        training__forgetting={"generalEval": {"uri": str(general)}},
        output={"uri": f"s3://{bucket}/runs/reported"},
    )
    result = finetune_run(job, env=s3_env)
    assert result.returncode == 0, result.output[-6000:]
    records = tiny.read_metrics(result.workdir)
    # The layout `finetune run examples/quickstart.yaml` leaves: metrics.jsonl and summary.json.
    assert (result.workdir / "summary.json").exists()

    out = tmp_path / "report"
    proc = finetune_report(str(result.workdir), "-o", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = summary_lines(proc.stdout)

    # Every number against metrics.jsonl.
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"], r["eval_perplexity"]) for r in records if "eval_loss" in r]
    generals = [(r["step"], r["general_loss"], r["general_perplexity"]) for r in records if "general_loss" in r]
    assert len(train) >= 8 and len(evals) >= 3 and len(generals) == 2, records
    assert lines["steps"] == "16 of 16 planned"
    best_train = min(train, key=lambda t: t[1])
    assert lines["train loss"] == (
        f"first {train[0][1]:.4f} (step {train[0][0]}), last {train[-1][1]:.4f} (step {train[-1][0]}), "
        f"best {best_train[1]:.4f} (step {best_train[0]})"
    )
    best_eval = min(evals, key=lambda e: e[1])
    assert lines["eval loss"] == (
        f"first {evals[0][1]:.4f} (step 0), last {evals[-1][1]:.4f}, best {best_eval[1]:.4f} (step {best_eval[0]}); "
        f"perplexity first {evals[0][2]:.4f}, last {evals[-1][2]:.4f}"
    )
    assert evals[-1][2] < evals[0][2], "the run did not learn: the report would be uninformative"
    assert lines["general loss"].startswith(f"first {generals[0][1]:.4f} (step 0), last {generals[-1][1]:.4f}")
    tokens = [r["tokens_per_second"] for r in records if "loss" in r]
    assert lines["mean tokens/s"] == f"{tokens[-1]:.1f}" and tokens[-1] > 0
    times = [r["time"] for r in records]
    m = re.fullmatch(r"(?:(\d+)m)?(\d+)s \(training (?:(\d+)m)?(\d+)s\)", lines["duration"])
    assert m, lines["duration"]
    shown = int(m.group(1) or 0) * 60 + int(m.group(2))
    assert abs(shown - (max(times) - min(times))) <= 1
    runtime = next(r["train_runtime"] for r in records if "train_runtime" in r)
    assert abs(int(m.group(3) or 0) * 60 + int(m.group(4)) - runtime) <= 1

    # What produced the model (its provenance.json), the train file by its sha256.
    digest = hashlib.sha256(train_jsonl.read_bytes()).hexdigest()
    assert f"  data (train): {train_jsonl} ({train_jsonl.stat().st_size} B, sha256 {digest})" in proc.stdout
    assert f"  data (general): {general}" in proc.stdout and "  seed: 7" in proc.stdout, proc.stdout
    assert re.search(r"^  model: \S+ sha256 [0-9a-f]{64}$", proc.stdout, re.M), proc.stdout

    # The plots: one per series, real pictures.
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOTS)
    assert [f"plot: {out / name}" for name in PLOTS] == [
        ln for ln in proc.stdout.splitlines() if ln.startswith("plot:")
    ]
    for name in PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == (800, 450), (name, image.size)
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10, f"{name} looks blank (pixel std {pixels.std():.1f})"
        assert (pixels < 128).mean() > 0.005, f"{name} has almost nothing drawn on it"

    # The run's output in object storage carries its metrics log (a pod's work directory is gone with
    # the pod): the same summary, read through s3://.
    remote = finetune_report(f"s3://{bucket}/runs/reported", "-o", str(tmp_path / "remote"), env=s3_env)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert proc.stdout.splitlines()[1:-4] == remote.stdout.splitlines()[1:-4]
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == sorted(PLOTS)
    missing = finetune_report(f"s3://{bucket}/runs/other", env=s3_env)
    assert missing.returncode == 2 and f"s3://{bucket}/runs/other/metrics.jsonl: not found" in missing.stderr


def test_report_of_a_classifier(finetune_run: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    """A classification job's report, from its output directory (what a pod leaves): the F1 line from
    metrics.jsonl, a per-class table and the confusion matrix from the evaluations the job saved."""
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.classification_rows(200, seed=4))
    held_out = tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.classification_rows(40, seed=5))
    job = tiny.job_manifest(
        "classified",
        tiny_model,
        train,
        task={"type": "classification", "classification": {"numLabels": len(tiny.COLORS), "labels": tiny.COLORS}},
        data={"train": {"uri": str(train)}, "eval": {"uri": str(held_out)}, "format": "classification"},
        training__maxSteps=12,
        training__evaluation={"everySteps": 6},
    )
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-6000:]
    output = result.workdir / "storage" / "local" / "classified" / "output"
    proc = finetune_report(str(output), "-o", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = summary_lines(proc.stdout)

    f1 = [(r["step"], r["eval_f1"]) for r in tiny.read_metrics(result.workdir) if "eval_f1" in r]
    best = max(f1, key=lambda s: s[1])
    assert (
        lines["eval F1"] == f"first {f1[0][1]:.4f} (step 0), last {f1[-1][1]:.4f}, best {best[1]:.4f} (step {best[0]})"
    )
    after = result.summary()["after"]
    table = proc.stdout.split("per class, after training:\n", 1)[1].splitlines()
    assert table[0].split() == ["class", "precision", "recall", "f1", "f1", "before"]
    assert table[1 + len(tiny.COLORS)].startswith("plot: "), table
    for color, row in zip(tiny.COLORS, table[1 : 1 + len(tiny.COLORS)], strict=True):
        values = row.split()
        assert values[0] == color
        assert [float(v) for v in values[1:4]] == [
            round(after[f"eval_{m}_{color}"], 3) for m in ("precision", "recall", "f1")
        ]
    # The confusion matrix: every eval example once, a real picture.
    assert sum(map(sum, after["eval_confusion_matrix"])) == 40
    with Image.open(tmp_path / "report" / "confusion_matrix.png") as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005
    assert (tmp_path / "report" / "eval_scores.png").is_file()


def test_report_of_a_multi_label_classifier(finetune_run: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    """A multi-label classifier's report: the per-class table, and a 2x2 confusion matrix per class
    (absent / present against not predicted / predicted) for each evaluation."""
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.classification_rows(120, seed=4, multi_label=True))
    held_out = tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.classification_rows(30, seed=5, multi_label=True))
    classification = {"numLabels": len(tiny.COLORS), "labels": tiny.COLORS, "multiLabel": True}
    job = tiny.job_manifest(
        "multi-labelled",
        tiny_model,
        train,
        task={"type": "classification", "classification": classification},
        data={"train": {"uri": str(train)}, "eval": {"uri": str(held_out)}, "format": "classification"},
        training__maxSteps=6,
    )
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-6000:]
    output = result.workdir / "storage" / "local" / "multi-labelled" / "output"
    proc = finetune_report(str(output), "-o", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.split("per class, after training:\n", 1)[1].splitlines()
    assert [row.split()[0] for row in table[1 : 1 + len(tiny.COLORS)]] == tiny.COLORS
    summary = result.summary()
    for when in ("before", "after"):
        matrices = summary[when]["eval_confusion_matrices"]
        assert len(matrices) == len(tiny.COLORS)
        assert all(sum(map(sum, m)) == 30 for m in matrices)  # every eval example once per class
    with Image.open(tmp_path / "report" / "confusion_matrix.png") as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
        # A row of 2x2 panels per evaluation (before, after): wider than tall.
        assert image.width > 2 * image.height
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005
