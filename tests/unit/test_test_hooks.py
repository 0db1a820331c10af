"""The trainer's test hooks (fault injection) cannot be reached from a manifest.

The trainer reads them from its process environment only. The only way a manifest puts anything into
that environment is ``spec.resources.env``, which refuses every name with the hooks' prefix, both in
``finetune validate`` and at the API server (the same row runs in the e2e parity table); and nothing
the operator or ``finetune run`` derives from a spec carries such a name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from finetune_operator import builders
from finetune_operator.api.trainer_config import build_trainer_config
from finetune_operator.api.v1alpha1 import TEST_HOOK_ENV_PREFIX, Dependency
from finetune_operator.api.validation import InvalidSpec, validate_object
from finetune_trainer import faults
from test_api_validation import base_manifest

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = builders.OperatorSettings(trainer_image="registry.example/trainer:1.2.3")


def manifest(env: list[dict[str, object]]) -> dict[str, object]:
    job = base_manifest()
    job["spec"]["resources"] = {"env": env}
    return job


def test_every_hook_variable_has_the_reserved_prefix() -> None:
    from finetune_trainer.recipes import classification

    assert faults.NONFINITE_LOSS_AT_STEP.startswith(TEST_HOOK_ENV_PREFIX)
    assert classification.BATCH_LOG.startswith(TEST_HOOK_ENV_PREFIX)


@pytest.mark.parametrize("name", [faults.NONFINITE_LOSS_AT_STEP, f"{TEST_HOOK_ENV_PREFIX}ANYTHING"])
def test_spec_env_refuses_the_hook_prefix(name: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_object(manifest([{"name": name, "value": "3"}]))
    [error] = info.value.errors
    assert error.path == "spec.resources.env[0].name" and "reserved for tests" in error.message


def test_other_finetune_variables_stay_settable() -> None:
    job = validate_object(manifest([{"name": "FINETUNE_PEAK_FLOPS", "value": "1e15"}]))
    assert [e.name for e in job.spec.resources.env] == ["FINETUNE_PEAK_FLOPS"]


def test_nothing_derived_from_a_spec_sets_a_hook() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not doc or doc.get("kind") != "FineTuneJob":
                continue
            job = validate_object(doc)
            pod = builders.job(job, "ml", "uid", 0, SETTINGS)["spec"]["template"]["spec"]
            names = [e["name"] for c in pod["containers"] for e in c.get("env", [])]
            assert not [n for n in names if n.startswith(TEST_HOOK_ENV_PREFIX)], (path, names)
            models = [  # another job's model (ftj://), as the operator resolves it
                Dependency(field=field, job=name, uri=f"s3://out/{name}/merged", sha256="ab" * 32)
                for field, name in job.spec.job_references().items()
            ]
            config = build_trainer_config(
                job, namespace="ml", base_dir=path.parent, default_storage="/tmp/s", dependencies=models
            )
            assert TEST_HOOK_ENV_PREFIX not in config.dumps(), path


def test_the_hook_is_off_unless_its_variable_is_set() -> None:
    assert faults.nonfinite_loss_step({}) is None
    assert faults.LossFaults({}).apply(2.0, step=3, training=True) == 2.0
    hook = faults.LossFaults({faults.NONFINITE_LOSS_AT_STEP: "3"})
    assert hook.apply(2.0, step=2, training=True) == 2.0
    assert hook.apply(2.0, step=3, training=False) == 2.0  # evaluation losses are left alone
    assert hook.apply(2.0, step=3, training=True) != hook.apply(2.0, step=3, training=True)  # NaN


def test_the_kill_hook_sends_sigkill_at_its_step_and_not_before() -> None:
    script = (
        "from finetune_trainer import faults\n"
        "hook = faults.LossFaults()\n"
        "for step in (1, 2, 3):\n"
        "    hook.apply(1.0, step=step, training=False)\n"
        "    hook.apply(1.0, step=step, training=True)\n"
        "    print(step, flush=True)\n"
    )
    env = {**os.environ, faults.KILL_AT_STEP: "3"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.split() == ["1", "2"]
