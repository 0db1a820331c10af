"""Every method trains ≥20 steps with falling loss through `finetune run`, and writes its outputs: the
artifact kinds spec.output.save asks for (`auto`: an adapter for PEFT methods, the model for `full`),
and nothing else."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.file_manifest import sha256_file
from runs import RunResult, assert_loss_falls
from safetensors import safe_open
from tiny import QLORA, job_manifest

METHODS: dict[str, dict[str, Any]] = {
    "full": {"method": {"type": "full"}, "training__learningRate": 1e-3},
    "freeze-head-only": {"method": {"type": "full", "freeze": {"headOnly": True}}, "training__learningRate": 1e-2},
    "freeze-last-layer": {"method": {"type": "full", "freeze": {"lastLayers": 1}}, "training__learningRate": 1e-3},
    "lora": {},
    "qlora": {
        **QLORA,
    },
    "prefix": {
        "method": {"type": "prefix", "prefix": {"numVirtualTokens": 8}},
        "training__learningRate": 5e-2,
        "output__save": "adapter",
    },
    "prompt": {
        "method": {"type": "prompt", "prompt": {"numVirtualTokens": 8, "initText": "what color"}},
        "training__learningRate": 3e-2,
    },
    "ia3": {"method": {"type": "ia3"}, "training__learningRate": 3e-2, "output__save": "merged"},
    "adalora": {
        "method": {
            "type": "adalora",
            "lora": {"alpha": 16, "dropout": 0.0},
            "adalora": {"initR": 8, "targetR": 4, "tinit": 2, "tfinal": 4, "deltaT": 2},
        },
    },
}

#: The artifact each case writes (the others write an adapter), and the folder it is in.
ARTIFACT = {"full": "model", "freeze-head-only": "model", "freeze-last-layer": "model", "ia3": "merged"}
FOLDER = {"adapter": "adapter", "merged": "merged", "model": "merged"}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_saves(
    method: str, tiny_model: Path, train_jsonl: Path, finetune_run: Callable[..., RunResult]
) -> None:
    manifest = job_manifest(method, tiny_model, train_jsonl, **METHODS[method])
    result = finetune_run(manifest)
    assert_loss_falls(result)
    summary = result.summary()
    assert summary["steps"] == 20
    assert summary["artifacts"], summary
    output = result.workdir / "storage" / "local" / method / "output"
    manifest_file = output / "manifest.json"
    files = json.loads(manifest_file.read_text())["files"]
    for entry in files:
        assert sha256_file(output / entry["path"]) == entry["sha256"]
    for artifact in summary["artifacts"]:
        assert artifact["sha256"] == sha256_file(manifest_file)
    kind = ARTIFACT.get(method, "adapter")
    assert [a["kind"] for a in summary["artifacts"]] == [kind]
    assert {p.name for p in output.iterdir() if p.is_dir()} == {FOLDER[kind]}
    if kind != "adapter":  # a model that loads without peft: no adapter config, no adapter weights
        assert not (output / "merged" / "adapter_config.json").exists()
        with safe_open(output / "merged" / "model.safetensors", "pt") as weights:
            names = list(weights.keys())
        assert names and not [n for n in names if re.search(r"lora_|ia3_|base_layer", n)]
