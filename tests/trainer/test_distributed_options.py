"""spec.distributed without a gang: the DeepSpeed config, generated or the user's from a ConfigMap, and
the collective backend reach DeepSpeed, transformers and the process group as the spec says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from accelerate.state import PartialState
from finetune_operator import builders
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from finetune_operator.api.validation import validate_object
from finetune_trainer import distributed
from finetune_trainer.training_args import deepspeed_config, training_arguments
from polling import free_port


def job(**spec: Any) -> FineTuneJob:
    base = {"model": {"uri": "org/m"}, "data": {"train": {"uri": "t.jsonl"}}, "training": {"maxSteps": 1}}
    return validate_object(
        {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "llm"}, "spec": base | spec}
    )


@pytest.fixture
def fresh_accelerate_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """TrainingArguments sets up accelerate's process-wide PartialState once; each test here gets its own
    (and the process keeps its earlier one afterwards)."""
    monkeypatch.setattr(PartialState, "_shared_state", {})
    yield


def test_zero3_keeps_the_parameters_on_the_device_unless_their_offload_is_asked() -> None:
    def zero(**deepspeed: Any) -> dict[str, Any]:
        spec: FineTuneJobSpec = job(distributed={"deepspeed": {"zeroStage": 3, **deepspeed}}).spec
        assert spec.distributed.deepspeed is not None
        config: dict[str, Any] = deepspeed_config(spec.distributed.deepspeed)["zero_optimization"]
        return config

    # offloadParams none (the default): no offload_param section, so DeepSpeed keeps them on the device.
    assert "offload_param" not in zero() and "offload_param" not in zero(offloadParams="none")
    assert zero(offloadParams="cpu")["offload_param"] == {"device": "cpu", "pin_memory": torch.cuda.is_available()}


def test_a_user_deepspeed_config_from_a_config_map_is_what_the_trainer_gets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_accelerate_state: None
) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what training_arguments sets on CPU, undone after the test
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 12345},
    }
    ftj = job(
        training={"maxSteps": 1, "perDeviceBatchSize": 3, "gradientAccumulationSteps": 5},
        distributed={"deepspeed": {"config": {"name": "ds-configs", "key": "zero1.json"}}},
        resources={"gpusPerNode": 0},
    )
    # The operator mounts the ConfigMap's key into the pod and points the trainer config at it.
    settings = builders.OperatorSettings()
    pod = builders.job(ftj, "ml", "uid", 0, settings)["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "deepspeed-config"]
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "deepspeed-config"]
    assert volume["configMap"] == {"name": "ds-configs"}
    assert (mount["subPath"], mount["readOnly"]) == ("zero1.json", True)
    config_map = builders.config_map(ftj, "ml", "uid", settings)
    config = TrainerConfig.model_validate(json.loads(config_map["data"][builders.CONFIG_KEY]))
    # The pod's file system, rooted at tmp_path: the file lies where the mount puts it, under the
    # trainer config's base_dir, and the trainer reads it from there.
    assert config.base_dir is not None
    mounted = tmp_path / Path(mount["mountPath"]).relative_to(config.base_dir)
    mounted.parent.mkdir(parents=True)
    mounted.write_text(json.dumps(user))
    args = training_arguments(config.spec, output_dir=tmp_path / "out", base_dir=str(tmp_path), has_eval=False)
    assert args.deepspeed == user
    # transformers fills its `auto` values from the spec; everything else is the user's.
    filled = args.hf_deepspeed_config.config
    assert filled["zero_optimization"] == user["zero_optimization"]
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (3, 5)


def test_backend_gloo_is_the_process_groups_where_auto_would_pick_nccl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_accelerate_state: None
) -> None:
    gloo = job(distributed={"backend": "gloo"}).spec
    # One process has no group, whatever the backend: transformers is told none (given "gloo", accelerate
    # asked a group that does not exist for its size, and every single-process gloo job crashed).
    assert training_arguments(gloo, output_dir=tmp_path, base_dir=None, has_eval=False).ddp_backend is None
    # A gang: TrainingArguments gets the backend of the group distributed.init brought up ...
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(PartialState, "_shared_state", {})
        assert training_arguments(gloo, output_dir=tmp_path, base_dir=None, has_eval=False).ddp_backend == "gloo"
    finally:
        dist.destroy_process_group()
    # ... which is the spec's: with GPUs, auto is nccl and gloo stays gloo (this machine has none; torch
    # is told it has).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (distributed.backend("auto"), distributed.backend("gloo")) == ("nccl", "gloo")
