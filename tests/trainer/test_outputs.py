"""The output contract: merged model ≡ base + adapter; QLoRA merges on the dequantized base; added tokens train."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer.outputs import ADDED_TOKENS_FILE, load_adapter_for_inference
from runs import RunResult, assert_loss_falls
from safetensors.torch import load_file
from tiny import CHATML, QLORA, job_manifest, prompt_completion_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _output(result: RunResult, name: str) -> Path:
    return result.workdir / "storage" / "local" / name / "output"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_lora_merged_equals_adapter_and_added_tokens_train(
    tied: bool,
    tiny_model: Path,
    tiny_model_tied: Path,
    tmp_path: Path,
    finetune_run: Callable[..., RunResult],
) -> None:
    model_dir = tiny_model_tied if tied else tiny_model
    rows = [{**r, "completion": r["completion"] + " <fruit-end>"} for r in prompt_completion_rows(300)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    name = "merge-tied" if tied else "merge"
    manifest = job_manifest(
        name,
        model_dir,
        train,
        output__save="both",
        model__addTokens=["<fruit-end>", "<unused-tok>"],
        checkpoint__everySteps=20,  # the provenance names the last checkpoint's manifest
    )
    result = finetune_run(manifest)
    assert_loss_falls(result)
    out = _output(result, name)
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    new_id = tokenizer.convert_tokens_to_ids("<fruit-end>")
    ids = tokenizer(["what color is the plum? the plum is purple <fruit-end>"], return_tensors="pt")["input_ids"]
    assert new_id in ids[0].tolist()

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    base_logits = _logits(base, ids)
    adapter_model = load_adapter_for_inference(base, out / "adapter")
    adapter_logits = _logits(adapter_model, ids)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    merged_logits = _logits(merged, ids)

    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-3
    if not tied:
        _check_provenance(result, out, model_dir, train)

    # The added token's embedding row was trained (it is used in the data). An unused added token's
    # input row gets no gradient; with tied embeddings the same row is also the output row, which the
    # softmax does train.
    deltas = load_file(str(out / "adapter" / ADDED_TOKENS_FILE))
    first = int(deltas["first"][0])
    assert deltas["input_delta"][new_id - first].abs().max() > 1e-4
    unused = tokenizer.convert_tokens_to_ids("<unused-tok>")
    assert ("output_delta" in deltas) == (not tied)
    if not tied:
        assert deltas["input_delta"][unused - first].abs().max() == 0
        assert deltas["output_delta"][unused - first].abs().max() > 0


def _check_provenance(result: RunResult, out: Path, model_dir: Path, train: Path) -> None:
    """The output's provenance.json says what produced it, each digest recomputed here from the files."""
    provenance = json.loads((out / "provenance.json").read_text())
    listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert "provenance.json" in listed  # the artifact's digest covers it
    summary = json.loads((result.workdir / "summary.json").read_text())
    assert summary["provenance"] == provenance
    model_files = [
        {"path": p.relative_to(model_dir).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(model_dir.rglob("*"))
        if p.is_file()
    ]
    assert provenance["model"] == {
        "uri": str(model_dir),
        "sha256": hashlib.sha256(json.dumps(model_files, sort_keys=True).encode()).hexdigest(),
    }
    assert provenance["data"] == [
        {"uri": str(train), "role": "train", "bytes": train.stat().st_size, "sha256": _sha256(train)}
    ]
    assert provenance["chatTemplateSha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
    assert re.fullmatch("[0-9a-f]{64}", provenance["tokenizerSha256"])
    assert provenance["seed"] == 7 and provenance["accelerator"] == "cpu"
    libraries = provenance["libraries"]
    assert libraries["torch"] == importlib.metadata.version("torch") and libraries["cuda"] == (
        torch.version.cuda or "none"
    )
    assert {"python", "transformers", "peft", "trl", "deepspeed", "bitsandbytes"} <= set(libraries)
    # The manifest the last checkpoint was committed with.
    manifest = Path(summary["last_checkpoint"].removeprefix("file://")) / "manifest.json"
    assert provenance["checkpointSha256"] == _sha256(manifest)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_qlora_merge_dequantizes_the_base(
    tiny_model: Path, train_jsonl: Path, finetune_run: Callable[..., RunResult]
) -> None:
    manifest = job_manifest(
        "qlora-merge",
        tiny_model,
        train_jsonl,
        **QLORA,
        output__save="both",
    )
    result = finetune_run(manifest)
    assert_loss_falls(result)
    out = _output(result, "qlora-merge")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    ids = tokenizer(["what taste is the lemon? the lemon is sour"], return_tensors="pt")["input_ids"]
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )
    adapter_logits = _logits(load_adapter_for_inference(quantized, out / "adapter"), ids)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    merged_logits = _logits(merged, ids)
    # The merged weights are the dequantized 4-bit base plus the LoRA update; the quantized model
    # computes with the same dequantized values (bf16 non-quantized modules bound the difference).
    torch.testing.assert_close(merged_logits, adapter_logits, atol=5e-2, rtol=0)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), ids)
    assert (merged_logits - base_logits).abs().max() > 1e-2
