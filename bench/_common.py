"""Shared by the benchmarks: a small model and data built here (no hub), and `finetune run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "trainer"))

import tiny  # noqa: E402


def build_model(directory: Path, *, hidden: int = 256, layers: int = 4) -> Path:
    """A Llama of a few million parameters: large enough that step time is not all overhead."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny.build_tiny_model(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def finetune_run(manifest: dict[str, Any], workdir: Path) -> dict[str, Any]:
    job = workdir.with_suffix(".yaml")
    tiny.write_manifest(job, manifest)
    finetune = Path(sys.executable).with_name("finetune")
    proc = subprocess.run(
        [str(finetune), "run", str(job), "--workdir", str(workdir)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"finetune run failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads((workdir / "summary.json").read_text()))
