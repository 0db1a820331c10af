"""FineTuneJob → children, without a cluster."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from finetune_operator import builders
from finetune_operator.api.trainer_config import (
    PERMANENT_EXIT_CODES,
    Rendezvous,
    TrainerConfig,
    preflight_command,
    storage_environment,
    trainer_command,
)
from finetune_operator.api.v1alpha1 import Dependency, FineTuneJob
from finetune_operator.api.validation import validate_object

UID = "0f7c6a4e-1111-2222-3333-444455556666"
SETTINGS = builders.OperatorSettings(trainer_image="registry.example/trainer:1.2.3")


def ftj(**spec: Any) -> FineTuneJob:
    base: dict[str, Any] = {
        "model": {"uri": "org/model"},
        "data": {"train": {"uri": "s3://b/train.jsonl"}},
        "training": {"maxSteps": 10},
        "distributed": {"nodes": 2, "procsPerNode": 4},
        "resources": {"gpusPerNode": 4, "cpu": 16, "memory": "128Gi"},
        "checkpoint": {"uri": "s3://ckpt", "credentials": {"name": "s3-creds"}, "endpointUrl": "http://minio:9000"},
    }
    base.update(spec)
    return validate_object(
        {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "llm"}, "spec": base}
    )


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_indexed_job_wires_a_torchrun_gang() -> None:
    job = builders.job(ftj(), "ml", UID, 0, SETTINGS)
    spec = job["spec"]
    assert job["metadata"]["name"] == "llm-a0"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        2,
        2,
        0,
    )
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "llm" and pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["image"] == "registry.example/trainer:1.2.3"
    argv = container["command"]
    assert argv[:3] == ["python", "-m", "finetune_trainer.launch"]
    assert {
        "--nnodes=2",
        "--nproc-per-node=4",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
    } <= set(argv)
    assert argv[-4:] == ["-m", "finetune_trainer", "--config", "/etc/finetune/trainer-config.json"]
    env = env_of(container)
    # Rank 0's stable hostname through the headless Service.
    assert env["MASTER_ADDR"] == "llm-a0-0.llm" and env["MASTER_PORT"] == "29500"
    assert env["FINETUNE_JOB_NAME"] == "llm" and env["FINETUNE_METRICS_PORT"] == "9410"
    assert env["FINETUNE_JOB_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4", "cpu": "16", "memory": "128Gi"}
    assert [p["containerPort"] for p in container["ports"]] == [29500, 9410, 9411, 9412, 9413]


def test_the_pod_runs_the_shared_trainer_command() -> None:
    # One argv builder for the pods and `finetune run` (tests/unit/test_cli.py checks the other side).
    [container] = builders.job(ftj(), "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]["containers"]
    gang = Rendezvous(
        nodes=2, node_rank="$(JOB_COMPLETION_INDEX)", master_addr="$(MASTER_ADDR)", master_port="$(MASTER_PORT)"
    )
    assert container["command"] == trainer_command(
        "/etc/finetune/trainer-config.json", nproc_per_node=4, python="python", rendezvous=gang
    )


def test_the_pod_environment_reaches_the_checkpoint_store_for_every_uri() -> None:
    # AWS_ENDPOINT_URL / AWS_REGION from spec.checkpoint, through the function `finetune run` uses too:
    # model, data and output URIs on the same store reach it, not only the checkpoints.
    job = ftj(
        checkpoint={"uri": "s3://ckpt", "everySteps": 5, "endpointUrl": "http://minio:9000", "region": "eu-west-1"}
    )
    assert storage_environment(job.spec) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"}
    env = env_of(builders.job(job, "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]["containers"][0])
    assert storage_environment(job.spec).items() <= env.items()
    plain = ftj(checkpoint={"uri": "s3://ckpt", "everySteps": 5})
    assert storage_environment(plain.spec) == {}
    env = env_of(builders.job(plain, "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]["containers"][0])
    assert not {"AWS_ENDPOINT_URL", "AWS_REGION"} & set(env)
    # A gs:// store's endpoint (an emulator, a GCS-compatible server) is the variable gcsfs reads.
    gcs = ftj(checkpoint={"uri": "gs://ckpt", "everySteps": 5, "endpointUrl": "http://gcs:4443"})
    assert storage_environment(gcs.spec) == {"STORAGE_EMULATOR_HOST": "http://gcs:4443"}
    env = env_of(builders.job(gcs, "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]["containers"][0])
    assert env["STORAGE_EMULATOR_HOST"] == "http://gcs:4443" and "AWS_ENDPOINT_URL" not in env


def test_every_finetune_variable_of_the_pod_is_read_by_the_trainer(repo: Path) -> None:
    # What the trainer needs from the spec it reads from its config; a FINETUNE_* variable the pod sets
    # and nothing reads (FINETUNE_METRICS_ENABLED, FINETUNE_ATTEMPT were) is dead weight that looks like
    # an interface.
    env = env_of(builders.job(ftj(), "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]["containers"][0])
    trainer = "\n".join(p.read_text() for p in (repo / "trainer_image" / "finetune_trainer").rglob("*.py"))
    names = [name for name in env if name.startswith("FINETUNE_")]
    assert names and [name for name in names if f'"{name}"' not in trainer] == []


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    pod = builders.job(ftj(), "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def test_pod_failure_policy_fails_fast_on_permanent_codes_and_counts_disruptions() -> None:
    rules = builders.job(ftj(), "ml", UID, 0, SETTINGS)["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == sorted(PERMANENT_EXIT_CODES)
    assert rules[1] == {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_scheduling_fields_queue_and_suspend_pass_through() -> None:
    job = builders.job(
        ftj(
            resources={
                "gpusPerNode": 8,
                "nodeSelector": {"pool": "h100"},
                "priorityClassName": "training",
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}},
                "imagePullSecrets": [{"name": "regcred"}],
                "image": "mine:1",
                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                "podAnnotations": {"sidecar.istio.io/inject": "false"},
            },
            runPolicy={"queueName": "gpu-queue"},
        ),
        "ml",
        UID,
        2,
        SETTINGS,
    )
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["priorityClassName"] == "training"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["containers"][0]["image"] == "mine:1"
    assert env_of(pod["containers"][0])["NCCL_DEBUG"] == "INFO"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # Kueue admits a queued Job by unsuspending it.
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["name"] == "llm-a2"
    assert job["spec"]["template"]["metadata"]["labels"]["finetune.io/attempt"] == "2"
    assert job["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_children_are_owned_and_the_role_is_least_privilege() -> None:
    kids = {c["kind"]: c for c in builders.children(ftj(), "ml", UID, SETTINGS)}
    assert set(kids) == {"ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding"}
    for child in kids.values():
        [owner] = child["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "finetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": "llm",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    assert kids["Role"]["rules"] == [
        {
            "apiGroups": ["finetune.io"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["llm"],
            "verbs": ["get", "patch"],
        }
    ]
    assert kids["Service"]["spec"]["clusterIP"] == "None"
    assert kids["Service"]["spec"]["publishNotReadyAddresses"] is True
    config = TrainerConfig.model_validate(json.loads(kids["ConfigMap"]["data"]["trainer-config.json"]))
    assert config.job.namespace == "ml" and config.checkpoint_dir == "s3://ckpt/ml/llm"


def test_no_wildcards_and_no_shell() -> None:
    job = builders.job(ftj(), "ml", UID, 0, SETTINGS)
    text = json.dumps([job, *builders.children(ftj(), "ml", UID, SETTINGS)])
    assert '"*"' not in text
    assert "sh" not in job["spec"]["template"]["spec"]["containers"][0]["command"][:2]


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize(
    ("credentials", "keys"),
    [
        pytest.param(
            {"name": "s3-creds"},
            {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
            id="default-keys",
        ),
        pytest.param(
            {"name": "s3-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret", "sessionTokenKey": "token"},
            {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"},
            id="own-keys-and-session-token",
        ),
    ],
)
def test_the_credentials_secret_keys_become_the_pods_aws_variables(
    credentials: dict[str, str], keys: dict[str, str]
) -> None:
    # Each key of the Secret feeds the variable boto/s3fs read; a session token only when named.
    job = ftj(checkpoint={"uri": "s3://ckpt", "credentials": credentials})
    env = env_of(container_of(builders.job(job, "ml", UID, 0, SETTINGS)))
    aws = {name: source for name, source in env.items() if name.startswith("AWS_")}
    assert aws == {var: {"secretKeyRef": {"name": "s3-creds", "key": key}} for var, key in keys.items()}


def test_gcs_and_azure_credentials_reach_the_pod_as_their_sdks_read_them() -> None:
    # gs://: the service-account key, one key of the Secret, is a read-only file (group-readable: the
    # trainer runs with the pod's fsGroup) that GOOGLE_APPLICATION_CREDENTIALS names; no AWS variable.
    gcs = ftj(checkpoint={"uri": "gs://ckpt", "credentials": {"name": "gcs-sa", "serviceAccountKeyKey": "key.json"}})
    pod = builders.job(gcs, "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"] == {
        "secretName": "gcs-sa",
        "items": [{"key": "key.json", "path": "service-account.json"}],
        "defaultMode": 0o440,
    }
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True and pod["securityContext"]["fsGroup"] == builders.TRAINER_UID
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == f"{mount['mountPath']}/service-account.json"
    assert not [name for name in env if name.startswith(("AWS_", "AZURE_"))]

    # az://: the connection string (account, key or SAS, endpoint) from its key; nothing mounted.
    azure = ftj(checkpoint={"uri": "az://ckpt", "credentials": {"name": "blob", "connectionStringKey": "conn"}})
    pod = builders.job(azure, "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["AZURE_STORAGE_CONNECTION_STRING"] == {"secretKeyRef": {"name": "blob", "key": "conn"}}
    assert not [v for v in pod["volumes"] if "secret" in v]
    assert not [name for name in env if name.startswith(("AWS_", "GOOGLE_"))]


def test_the_pod_grace_period_is_the_checkpoint_grace_period_plus_a_margin() -> None:
    # The kubelet waits terminationGracePeriodSeconds between SIGTERM and SIGKILL: the preemption save
    # gets gracePeriodSeconds, and the pod 30 s more to commit and exit. The trainer reads the same value
    # from its config (it warns when a preemption save took longer).
    for checkpoint, grace in (({"uri": "s3://ckpt"}, 120), ({"uri": "s3://ckpt", "gracePeriodSeconds": 600}, 600)):
        job = ftj(checkpoint=checkpoint)
        pod = builders.job(job, "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == grace + builders.GRACE_MARGIN_SECONDS == grace + 30
        config_map = builders.config_map(job, "ml", UID, SETTINGS)
        config = TrainerConfig.model_validate(json.loads(config_map["data"][builders.CONFIG_KEY]))
        assert config.spec.checkpoint.grace_period_seconds == grace


def test_the_trainer_config_holds_the_resolved_models_of_other_jobs_and_their_digests() -> None:
    job = ftj(model={"uri": "ftj://cpt"}, task={"type": "rl", "rl": {"rewardModel": "ftj://rm", "numGenerations": 2}})
    # Unresolved: no trainer config yet (nothing that reads it is created before it is).
    assert "ConfigMap" not in [c["kind"] for c in builders.children(job, "ml", UID, SETTINGS)]
    with pytest.raises(ValueError, match=r"unresolved model references: spec\.model\.uri, spec\.task\.rl\.rewardModel"):
        builders.config_map(job, "ml", UID, SETTINGS)
    resolved = [
        Dependency(field="spec.model.uri", job="cpt", uri="s3://out/cpt/merged", sha256="ab" * 32),
        Dependency(field="spec.task.rl.rewardModel", job="rm", uri="s3://out/rm/merged", sha256="cd" * 32),
    ]
    [config_map] = [c for c in builders.children(job, "ml", UID, SETTINGS, resolved) if c["kind"] == "ConfigMap"]
    config = TrainerConfig.model_validate(json.loads(config_map["data"][builders.CONFIG_KEY]))
    assert config.spec.model.uri == "s3://out/cpt/merged"
    assert config.spec.task.rl is not None and config.spec.task.rl.reward_model == "s3://out/rm/merged"
    assert config.model_digests == {"s3://out/cpt/merged": "ab" * 32, "s3://out/rm/merged": "cd" * 32}


@pytest.mark.parametrize(
    ("gpus", "procs"), [pytest.param(8, 8, id="one-process-per-gpu"), pytest.param(0, 1, id="one-process-on-cpu")]
)
def test_auto_procs_per_node_is_one_process_per_gpu(gpus: int, procs: int) -> None:
    job = ftj(distributed={"nodes": 2, "procsPerNode": "auto"}, resources={"gpusPerNode": gpus})
    container = container_of(builders.job(job, "ml", UID, 0, SETTINGS))
    assert [arg for arg in container["command"] if arg.startswith("--nproc-per-node=")] == [f"--nproc-per-node={procs}"]
    # One metrics port per local rank.
    metrics = [p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics")]
    assert metrics == [9410 + rank for rank in range(procs)]


@pytest.mark.parametrize(
    ("metrics", "rendezvous", "container_ports", "service_ports"),
    [
        pytest.param(
            {"enabled": True},
            29500,
            {"rendezvous": 29500, "metrics-0": 9410, "metrics-1": 9411},
            {"rendezvous": 29500, "metrics": 9410},
            id="enabled",
        ),
        # With metrics off the rendezvous may take the metrics port (admission allows it): nothing lists
        # that port twice (the API server refuses a Service with a duplicate (protocol, port) pair).
        pytest.param({"enabled": False}, 9410, {"rendezvous": 9410}, {"rendezvous": 9410}, id="disabled"),
    ],
)
def test_metrics_ports_exist_only_when_metrics_are_enabled(
    metrics: dict[str, bool], rendezvous: int, container_ports: dict[str, int], service_ports: dict[str, int]
) -> None:
    # The chart's PodMonitor scrapes the container ports named metrics or metrics-<local rank>.
    job = ftj(metrics=metrics, distributed={"nodes": 2, "procsPerNode": 2, "rendezvousPort": rendezvous})
    container = container_of(builders.job(job, "ml", UID, 0, SETTINGS))
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == container_ports
    service = builders.service(job, "ml", UID, SETTINGS)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == service_ports


def test_extra_environment_takes_literals_and_secret_and_config_map_keys() -> None:
    extra = [
        {"name": "NCCL_DEBUG", "value": "INFO"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}},
        {"name": "WANDB_PROJECT", "valueFrom": {"configMapKeyRef": {"name": "tracking", "key": "project"}}},
    ]
    job = ftj(resources={"gpusPerNode": 4, "env": extra})
    env = container_of(builders.job(job, "ml", UID, 0, SETTINGS))["env"]
    assert [e for e in env if e["name"] in {"NCCL_DEBUG", "HF_TOKEN", "WANDB_PROJECT"}] == extra


def test_accelerators_and_shared_memory_follow_the_resources_spec() -> None:
    job = ftj(
        distributed={"nodes": 1, "procsPerNode": 2},
        resources={"gpusPerNode": 2, "gpuResourceName": "amd.com/gpu", "sharedMemory": "16Gi"},
    )
    rendered = builders.job(job, "ml", UID, 0, SETTINGS)
    assert container_of(rendered)["resources"] == {"limits": {"amd.com/gpu": "2"}}
    shm = next(v for v in rendered["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}


@pytest.mark.parametrize("policy", ["Always", "IfNotPresent", "Never"])
def test_the_image_pull_policy_follows_the_spec_unless_the_operator_overrides_it(policy: str) -> None:
    # A :latest image: left out, the API server would default the policy to Always.
    job = ftj(resources={"gpusPerNode": 4, "image": "registry.example/trainer:latest", "imagePullPolicy": policy})
    assert container_of(builders.job(job, "ml", UID, 0, SETTINGS))["imagePullPolicy"] == policy
    # The operator's --image-pull-policy (the chart's trainer.pullPolicy) overrides every job's, as documented.
    override = "Always" if policy == "Never" else "Never"
    pinned = replace(SETTINGS, image_pull_policy=override)
    assert container_of(builders.job(job, "ml", UID, 0, pinned))["imagePullPolicy"] == override


def test_pod_labels_reach_the_pods_and_the_operators_own_labels_win() -> None:
    pod_labels = {"team": "nlp", "finetune.io/job": "other", "app.kubernetes.io/managed-by": "someone"}
    job = ftj(resources={"gpusPerNode": 4, "podLabels": pod_labels})
    labels = builders.job(job, "ml", UID, 1, SETTINGS)["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "nlp"
    # The PodMonitor and the operator's pod index select on these: a pod label cannot take them over.
    assert (labels["finetune.io/job"], labels["app.kubernetes.io/managed-by"], labels["finetune.io/attempt"]) == (
        "llm",
        "finetune-operator",
        "1",
    )
    # podLabels may change on a running job (resources are mutable): the next gang attempt's Job, built
    # from the changed spec, carries the new labels.
    changed = ftj(resources={"gpusPerNode": 4, "podLabels": {"team": "vision"}})
    assert builders.job(changed, "ml", UID, 2, SETTINGS)["spec"]["template"]["metadata"]["labels"]["team"] == "vision"


def test_tolerations_reach_the_pods_as_written() -> None:
    tolerations = [
        {"key": "gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "PreferNoSchedule"},
        {
            "key": "node.kubernetes.io/unreachable",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 600,
        },
    ]
    job = ftj(resources={"gpusPerNode": 4, "tolerations": tolerations})
    assert builders.job(job, "ml", UID, 0, SETTINGS)["spec"]["template"]["spec"]["tolerations"] == tolerations


def test_the_preflight_job_is_cpu_only_with_its_own_resources_and_the_jobs_credentials(repo: Path) -> None:
    job = ftj(
        resources={
            "gpusPerNode": 4,
            "cpu": 16,
            "memory": "128Gi",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}},
            "priorityClassName": "gpu-training",
            "imagePullSecrets": [{"name": "regcred"}],
            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}],
            "podLabels": {"team": "nlp"},
            "podAnnotations": {"sidecar.istio.io/inject": "false"},
        },
        preflight={"resources": {"cpu": "2", "memory": "6Gi"}, "activeDeadlineSeconds": 900},
    )
    pf = builders.preflight_job(job, "ml", UID, 1, SETTINGS)
    assert pf["metadata"]["name"] == "llm-pf1" and pf["metadata"]["ownerReferences"][0]["uid"] == UID
    spec = pf["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 0)
    assert spec["activeDeadlineSeconds"] == 900 and spec["ttlSecondsAfterFinished"] == builders.PREFLIGHT_TTL_SECONDS
    # Its pod is in the operator's pod index (the labels it selects on) and told apart from a gang's.
    labels = spec["template"]["metadata"]["labels"]
    assert labels["finetune.io/job"] == "llm" and labels["app.kubernetes.io/managed-by"] == "finetune-operator"
    assert labels["finetune.io/preflight-attempt"] == "1" and "finetune.io/attempt" not in labels
    assert labels["team"] == "nlp" and spec["template"]["metadata"]["annotations"] == {
        "sidecar.istio.io/inject": "false"
    }
    pod = spec["template"]["spec"]
    # CPU only: no accelerator, none of the GPU nodes' scheduling.
    assert "nvidia.com" not in json.dumps(pod)
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName", "subdomain"} & set(pod)
    [container] = pod["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "6Gi"},
        "limits": {"cpu": "2", "memory": "6Gi"},
    }
    assert container["command"] == preflight_command("/etc/finetune/trainer-config.json")
    assert container["command"][:5] == ["python", "-m", "finetune_trainer", "preflight", "--config"]
    assert container["image"] == "registry.example/trainer:1.2.3" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    # The result is the termination message, and the last log lines when the container dies without one.
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # The gang's config, credentials and extra environment; no rendezvous, no metrics, no job identity.
    assert {"name": "config", "configMap": {"name": "llm-config"}} in pod["volumes"]
    env = env_of(container)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["HF_TOKEN"] == {
        "secretKeyRef": {"name": "hub", "key": "token"}
    }
    assert env["FINETUNE_TERMINATION_LOG"] == "/dev/termination-log"
    assert not {"MASTER_ADDR", "MASTER_PORT", "FINETUNE_METRICS_PORT", "FINETUNE_JOB_NAME"} & set(env)
    trainer = "\n".join(p.read_text() for p in (repo / "trainer_image" / "finetune_trainer").rglob("*.py"))
    assert [name for name in env if name.startswith("FINETUNE_") and f'"{name}"' not in trainer] == []
    # Restricted Pod Security, the job's ServiceAccount (a cloud's workload identity) without an API token.
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "llm-trainer"
    assert pod["automountServiceAccountToken"] is False
    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == builders.TRAINER_UID
    )
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert '"*"' not in json.dumps(pf)
    # The defaults: 4 CPUs, 8Gi, an hour.
    default = builders.preflight_job(ftj(), "ml", UID, 0, SETTINGS)
    [plain] = default["spec"]["template"]["spec"]["containers"]
    assert (
        plain["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
        and default["spec"]["activeDeadlineSeconds"] == 3600
    )
