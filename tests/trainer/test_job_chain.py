"""A job that trains on another job's model (``ftj://NAME``), on this machine: `finetune run` resolves it
from the earlier local run of NAME, and the trainer verifies it is the very output that run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import tiny
from finetune_operator.api.trainer_config import EXIT_INVALID_CONFIG


def finetune(manifest: dict[str, Any], runs: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`finetune run` with its default layout: the run of job NAME in ``runs/NAME``."""
    name = manifest["metadata"]["name"]
    job = tiny.write_manifest(tmp_path / f"{name}.yaml", manifest)
    return subprocess.run(
        [str(Path(sys.executable).with_name("finetune")), "run", str(job), "--workdir", str(runs / name)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def test_a_job_trains_on_the_merged_model_of_an_earlier_run_and_refuses_one_that_changed(
    tiny_model: Path, train_jsonl: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    second = tiny.job_manifest("sft-on-cpt", tiny_model, train_jsonl, training__maxSteps=4)
    second["spec"]["model"]["uri"] = "ftj://cpt"
    missing = finetune(second, runs, tmp_path)
    assert missing.returncode == EXIT_INVALID_CONFIG, missing.stderr[-3000:]
    assert "spec.model.uri: ftj://cpt: no earlier local run of FineTuneJob cpt" in missing.stderr

    first = tiny.job_manifest("cpt", tiny_model, train_jsonl, training__maxSteps=6, output__save="merged")
    done = finetune(first, runs, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [merged] = json.loads((runs / "cpt" / "summary.json").read_text())["artifacts"]

    chained = finetune(second, runs, tmp_path)
    assert chained.returncode == 0, chained.stderr[-3000:]
    config = json.loads((runs / "sft-on-cpt" / "trainer-config.json").read_text())
    assert config["spec"]["model"]["uri"] == merged["uri"]
    assert config["modelDigests"] == {merged["uri"]: merged["sha256"]}
    provenance = json.loads((runs / "sft-on-cpt" / "provenance.json").read_text())
    assert provenance["model"]["uri"] == merged["uri"]

    # The earlier output replaced behind the job's back (one weight file rewritten): refused, naming the field.
    weights = next(Path(merged["uri"]).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    manifest = Path(merged["uri"]).parent / "manifest.json"
    entries = json.loads(manifest.read_text())
    changed = finetune({**second, "metadata": {"name": "sft-on-changed"}}, runs, tmp_path)
    assert changed.returncode == EXIT_INVALID_CONFIG, changed.stderr[-3000:]
    assert f"spec.model.uri: {merged['uri']}: merged/{weights.name} does not match the output's manifest" in (
        changed.stderr
    )
    # ...and a manifest rewritten to match is not the one resolved.
    for entry in entries["files"]:
        if entry["path"] == f"merged/{weights.name}":
            entry["sha256"] = "0" * 64
    manifest.write_text(json.dumps(entries))
    rewritten = finetune({**second, "metadata": {"name": "sft-on-rewritten"}}, runs, tmp_path)
    assert rewritten.returncode == EXIT_INVALID_CONFIG, rewritten.stderr[-3000:]
    assert "is not the one resolved: its manifest's sha256 is" in rewritten.stderr
