"""Two CPU ranks under torchrun (gloo): DDP with LoRA and full, DeepSpeed ZeRO-1, ZeRO-2 (also with the
optimizer offloaded to the host, stepped by DeepSpeed's compiled CPU Adam) and ZeRO-3, QLoRA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runs import RunResult, assert_loss_falls
from tiny import QLORA, job_manifest

CASES: dict[str, dict[str, Any]] = {
    "ddp-lora": {},
    "ddp-full": {"method": {"type": "full"}, "training__learningRate": 1e-3},
    "zero1-lora": {"distributed__deepspeed": {"zeroStage": 1}},
    "zero2-lora": {"distributed__deepspeed": {"zeroStage": 2}},
    "zero2-offload-lora": {"distributed__deepspeed": {"zeroStage": 2, "offloadOptimizer": "cpu"}},
    "zero3-full": {
        "method": {"type": "full"},
        "training__learningRate": 1e-3,
        "distributed__deepspeed": {"zeroStage": 3},
    },
    "zero3-lora": {"distributed__deepspeed": {"zeroStage": 3}},
    "ddp-qlora": {
        **QLORA,
        "training__gradientCheckpointing": True,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks(case: str, tiny_model: Path, train_jsonl: Path, finetune_run: Callable[..., RunResult]) -> None:
    manifest = job_manifest(case, tiny_model, train_jsonl, **CASES[case])
    result = finetune_run(manifest, "--nproc", "2")
    assert_loss_falls(result)
    summary = result.summary()
    assert summary["world_size"] == 2
    if "zero3" in case:
        # ZeRO-3 really partitioned the parameters: each rank holds only its shard.
        assert summary["zero3_partitioned_parameters"] > 0, summary
    # ZeRO-Offload: the optimizer state lives on the host and DeepSpeed's compiled CPU Adam steps it.
    assert summary["optimizer"] == ("DeepSpeedCPUAdam" if "offload" in case else "AdamW"), summary
    assert summary["artifacts"]
