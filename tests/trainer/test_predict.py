"""`finetune predict OUTPUT --input FILE`: a job's saved model run on records, as a user checks it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from runs import RunResult
from tiny import job_manifest, prompt_completion_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

FINETUNE = str(Path(sys.executable).with_name("finetune"))


def predict(output: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FINETUNE, "predict", str(output), *args], capture_output=True, text=True, timeout=300, check=False
    )


def lines(text: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in text.splitlines()]


def test_predict_runs_the_saved_adapter_and_merged_model(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(300))
    result = finetune_run(job_manifest("predicted", tiny_model, train, output__save="both"))
    assert result.returncode == 0, result.output[-4000:]
    output = result.workdir / "storage" / "local" / "predicted" / "output"
    questions = write_jsonl(tmp_path / "questions.jsonl", prompt_completion_rows(4, seed=1))

    by_artifact = {}
    for artifact in ("adapter", "merged"):
        done = predict(output, "--input", str(questions), "--artifact", artifact, "--max-new-tokens", "6")
        assert done.returncode == 0, done.stderr[-4000:]
        assert f"4 predictions ({artifact})" in done.stderr
        by_artifact[artifact] = lines(done.stdout)
    merged = by_artifact["merged"]
    assert [p["where"] for p in merged] == [f"{questions}:{n}" for n in range(1, 5)]
    assert [p["reference"] for p in merged] == [r["completion"] for r in prompt_completion_rows(4, seed=1)]
    # The adapter on its base and the merged model are the same function: the same greedy text.
    assert [p["prediction"] for p in by_artifact["adapter"]] == [p["prediction"] for p in merged]

    # What a practitioner would run on the merged model by hand gives the same completions.
    model = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(output / "merged")
    for row, prediction in zip(prompt_completion_rows(4, seed=1), merged, strict=True):
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True) == prediction["prediction"]

    # An artifact's own URI (as status.artifacts lists it) names the output too; --predictions writes a file.
    into = tmp_path / "predictions.jsonl"
    done = predict(output / "adapter", "--input", str(questions), "--max-new-tokens", "6", "--predictions", str(into))
    assert done.returncode == 0 and done.stdout == "", done.stderr[-4000:]
    assert lines(into.read_text()) == by_artifact["adapter"]

    # Records of the wrong shape: every bad one as file:line, exit 3, before any model is loaded.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "what color is the plum?"}, {"completion": "x"}])
    done = predict(output, "--input", str(bad))
    assert done.returncode == 3, done.stderr
    assert f"{bad}:1: missing column 'completion'" in done.stderr and f"{bad}:2:" in done.stderr

    # A changed file of the output is refused (exit 2), naming the file.
    weights = output / "merged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    done = predict(output, "--input", str(questions))
    assert done.returncode == 2, done.stderr
    assert "merged/model.safetensors: does not match its sha256 in manifest.json" in done.stderr
