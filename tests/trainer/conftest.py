"""Fixtures for CPU training tests: a tiny model built from a config, data, and a `finetune run` driver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny
from runs import RunResult

RUN_TIMEOUT = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/trainer" in str(item.fspath):
            item.add_marker(pytest.mark.trainer)


@pytest.fixture(scope="session")
def tiny_model_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny-model-tied"), tie_embeddings=True)


@pytest.fixture(scope="session")
def train_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", tiny.prompt_completion_rows(400))


@pytest.fixture
def finetune_run(tmp_path: Path) -> Callable[..., RunResult]:
    """Run `finetune run MANIFEST` as a user does (a subprocess, torchrun underneath)."""

    def run(
        manifest: dict[str, Any], *extra: str, name: str | None = None, env: dict[str, str] | None = None
    ) -> RunResult:
        job_file = tiny.write_manifest(tmp_path / f"{name or manifest['metadata']['name']}.yaml", manifest)
        workdir = tmp_path / f"run-{manifest['metadata']['name']}"
        exe = Path(sys.executable).with_name("finetune")
        proc = subprocess.run(
            [str(exe), "run", str(job_file), "--workdir", str(workdir), *extra],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            check=False,
        )
        return RunResult(proc.returncode, proc.stdout + proc.stderr, workdir)

    return run


@pytest.fixture(scope="session")
def tiny_with_code(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a repository with its own modeling code (a model type transformers does not
    know), whose model class does not support sdpa attention."""
    directory = tmp_path_factory.mktemp("tiny-with-code")
    shutil.copytree(tiny_model, directory, dirs_exist_ok=True)
    (directory / "configuration_fruit.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass FruitConfig(LlamaConfig):\n    model_type = 'fruit-llama'\n"
    )
    (directory / "modeling_fruit.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_fruit import FruitConfig\n\n\n"
        "class FruitForCausalLM(LlamaForCausalLM):\n    config_class = FruitConfig\n    _supports_sdpa = False\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="fruit-llama",
        architectures=["FruitForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_fruit.FruitConfig",
            "AutoModelForCausalLM": "modeling_fruit.FruitForCausalLM",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory
