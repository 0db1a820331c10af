"""FineTuneJob → child manifests, as pure functions (no API calls; tested without a cluster).

For a FineTuneJob ``NAME`` in namespace ``NS`` the operator owns:

- ConfigMap ``NAME-config``: the trainer config (``trainer-config.json``), derived by
  :func:`~finetune_operator.api.trainer_config.build_trainer_config`;
- headless Service ``NAME``: stable DNS for the rendezvous, published before pods are ready;
- ServiceAccount, Role and RoleBinding ``NAME-trainer``: the trainer may get and patch the status of
  this FineTuneJob only (resourceNames), to report progress;
- an Indexed Job ``NAME-a<attempt>`` per gang attempt: completions = parallelism = nodes; pod ``i``
  runs torchrun with ``--node-rank`` = its completion index and rendezvouses at pod 0's stable
  hostname ``NAME-a<attempt>-0.NAME``. A gang restart replaces the whole Job with the next attempt.
- with ``spec.preflight.mode: auto``, before the first gang, a Job ``NAME-pf<attempt>`` per preflight
  attempt: one CPU-only pod of the trainer image running ``python -m finetune_trainer preflight`` on the
  same ConfigMap, credentials and ServiceAccount, which leaves its result (a PreflightResult as JSON) in
  its termination message for the operator to read.

Every child carries an owner reference to the FineTuneJob, so deleting the job deletes them all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .api.trainer_config import (
    PERMANENT_EXIT_CODES,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    Rendezvous,
    build_trainer_config,
    preflight_command,
    storage_environment,
    trainer_command,
)
from .api.v1alpha1 import API_VERSION, KIND, CredentialsRef, Dependency, FineTuneJob

LABEL_JOB = "finetune.io/job"
LABEL_ATTEMPT = "finetune.io/attempt"
#: On the preflight Job and its pod (instead of LABEL_ATTEMPT): the preflight attempt.
LABEL_PREFLIGHT = "finetune.io/preflight-attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
#: Kueue's API (Workloads: what Kueue decided about a queued gang Job).
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
MANAGER = "finetune-operator"

CONTAINER = "trainer"
PREFLIGHT_CONTAINER = "preflight"
#: A finished preflight Job (and its pod, with its log) is kept this long: the result is in status.preflight.
PREFLIGHT_TTL_SECONDS = 86400
CONFIG_KEY = "trainer-config.json"
CONFIG_DIR = "/etc/finetune"
IMAGE_ROOT = "/opt/finetune"  #: the image's working copy: relative paths and referenced configs resolve here
WORK_DIR = "/workspace/run"
TRAINER_UID = 10001
#: Where a gs:// service-account key from ``spec.checkpoint.credentials`` is mounted (read-only).
GCS_KEY_DIR = "/var/run/secrets/finetune.io/gcs"
GCS_KEY_FILE = "service-account.json"
#: Seconds the pod gets on top of the checkpoint grace period to commit and exit.
GRACE_MARGIN_SECONDS = 30


@dataclass(frozen=True)
class OperatorSettings:
    """Operator-wide settings that shape children (from the operator's command line)."""

    trainer_image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    image_pull_policy: str | None = None
    extra_labels: dict[str, str] = field(default_factory=dict)


def config_map_name(job: str) -> str:
    return f"{job}-config"


def service_name(job: str) -> str:
    return job


def trainer_account_name(job: str) -> str:
    return f"{job}-trainer"


def job_name(job: str, attempt: int) -> str:
    return f"{job}-a{attempt}"


def preflight_job_name(job: str, attempt: int) -> str:
    return f"{job}-pf{attempt}"


def labels(ftj: FineTuneJob, settings: OperatorSettings, **extra: str) -> dict[str, str]:
    return {
        **settings.extra_labels,
        LABEL_NAME: "finetune-trainer",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_JOB: ftj.metadata.name,
        **extra,
    }


def owner_reference(ftj: FineTuneJob, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ftj.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(name: str, namespace: str, ftj: FineTuneJob, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(ftj, settings),
        "ownerReferences": [owner_reference(ftj, uid)],
    }


def config_map(
    ftj: FineTuneJob,
    namespace: str,
    uid: str,
    settings: OperatorSettings,
    dependencies: Sequence[Dependency] = (),
) -> dict[str, Any]:
    """The trainer config (``dependencies``: the spec's ``ftj://`` models, resolved)."""
    config = build_trainer_config(
        ftj, namespace=namespace, base_dir=IMAGE_ROOT, work_dir=WORK_DIR, dependencies=dependencies
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(config_map_name(ftj.metadata.name), namespace, ftj, uid, settings),
        "data": {CONFIG_KEY: config.dumps()},
    }


def service(ftj: FineTuneJob, namespace: str, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    spec = ftj.spec
    ports: list[dict[str, Any]] = [{"name": "rendezvous", "port": spec.distributed.rendezvous_port, "protocol": "TCP"}]
    if spec.metrics.enabled:
        # Only when served: with metrics off the rendezvous may take the metrics port, and the API server
        # refuses a Service that lists one (protocol, port) pair twice.
        ports.append({"name": "metrics", "port": spec.metrics.port, "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service_name(ftj.metadata.name), namespace, ftj, uid, settings),
        "spec": {
            "clusterIP": "None",
            # DNS records exist before the pods are ready: rank 0's name resolves at rendezvous time.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: ftj.metadata.name},
            "ports": ports,
        },
    }


def service_account(ftj: FineTuneJob, namespace: str, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(trainer_account_name(ftj.metadata.name), namespace, ftj, uid, settings),
    }


def role(ftj: FineTuneJob, namespace: str, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(trainer_account_name(ftj.metadata.name), namespace, ftj, uid, settings),
        "rules": [
            {
                "apiGroups": [API_VERSION.split("/")[0]],
                "resources": ["finetunejobs/status"],
                "resourceNames": [ftj.metadata.name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def role_binding(ftj: FineTuneJob, namespace: str, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    name = trainer_account_name(ftj.metadata.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(name, namespace, ftj, uid, settings),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }


def procs_per_node(ftj: FineTuneJob) -> int:
    procs = ftj.spec.distributed.procs_per_node
    if procs == "auto":
        return max(ftj.spec.resources.gpus_per_node, 1)
    return int(procs)


def pod_command(ftj: FineTuneJob) -> list[str]:
    """The container's argv: torchrun through our launcher, pod ``i`` being node ``i`` of the gang.

    ``$(VAR)`` references are expanded by the kubelet from the container's env.
    """
    rendezvous = Rendezvous(
        nodes=ftj.spec.distributed.nodes,
        node_rank="$(JOB_COMPLETION_INDEX)",
        master_addr="$(MASTER_ADDR)",
        master_port="$(MASTER_PORT)",
    )
    return trainer_command(f"{CONFIG_DIR}/{CONFIG_KEY}", nproc_per_node=procs_per_node(ftj), rendezvous=rendezvous)


def _env(ftj: FineTuneJob, namespace: str, attempt: int) -> list[dict[str, Any]]:
    spec = ftj.spec
    name = ftj.metadata.name
    env: list[dict[str, Any]] = [
        {"name": "MASTER_ADDR", "value": f"{job_name(name, attempt)}-0.{service_name(name)}"},
        {"name": "MASTER_PORT", "value": str(spec.distributed.rendezvous_port)},
        {"name": "FINETUNE_JOB_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "FINETUNE_JOB_NAME", "value": name},
        {"name": "FINETUNE_METRICS_PORT", "value": str(spec.metrics.port)},
        {"name": "HOME", "value": "/workspace"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
    ]
    env += [{"name": var, "value": value} for var, value in storage_environment(spec).items()]
    env += _credentials_env(spec.checkpoint.credentials)
    for var in spec.resources.env:
        env.append(var.to_manifest())
    return env


def _credentials_env(creds: CredentialsRef | None) -> list[dict[str, Any]]:
    """The variables each store's SDK reads its credentials from, filled from the Secret's keys: a
    service-account key file for gs:// (mounted by :func:`_volumes`), a connection string for az://,
    else an S3 access key (the Secret's keys default to the variables' names)."""
    if creds is None:
        return []
    if creds.service_account_key_key is not None:
        return [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_KEY_DIR}/{GCS_KEY_FILE}"}]
    if creds.connection_string_key is not None:
        pairs = [("AZURE_STORAGE_CONNECTION_STRING", creds.connection_string_key)]
    else:
        pairs = [
            ("AWS_ACCESS_KEY_ID", creds.access_key_id_key or "AWS_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", creds.secret_access_key_key or "AWS_SECRET_ACCESS_KEY"),
        ]
        if creds.session_token_key:
            pairs.append(("AWS_SESSION_TOKEN", creds.session_token_key))
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": creds.name, "key": key}}} for var, key in pairs]


def _resources(ftj: FineTuneJob) -> dict[str, Any]:
    r = ftj.spec.resources
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if r.gpus_per_node:
        limits[r.gpu_resource_name] = str(r.gpus_per_node)
    for key, value in (("cpu", r.cpu), ("memory", r.memory)):
        if value is not None:
            requests[key] = limits[key] = str(value)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _volumes(ftj: FineTuneJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    name = ftj.metadata.name
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(name)}},
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        # The collective backend and data loaders need a real /dev/shm; the runtime's default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(ftj.spec.resources.shared_memory)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "workspace", "mountPath": "/workspace"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    creds = ftj.spec.checkpoint.credentials
    if creds is not None and creds.service_account_key_key is not None:
        # Readable by the trainer's group (fsGroup) only.
        item = {"key": creds.service_account_key_key, "path": GCS_KEY_FILE}
        volumes.append({"name": "gcs-key", "secret": {"secretName": creds.name, "items": [item], "defaultMode": 0o440}})
        mounts.append({"name": "gcs-key", "mountPath": GCS_KEY_DIR, "readOnly": True})
    ds = ftj.spec.distributed.deepspeed
    if ds is not None and ds.config is not None:
        volumes.append({"name": "deepspeed-config", "configMap": {"name": ds.config.name}})
        mounts.append(
            {
                "name": "deepspeed-config",
                "mountPath": f"{IMAGE_ROOT}/{ds.config.name}/{ds.config.key}",
                "subPath": ds.config.key,
                "readOnly": True,
            }
        )
    return volumes, mounts


def _container_security() -> dict[str, Any]:
    """The restricted Pod Security profile, for every container the operator runs."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_template(ftj: FineTuneJob, namespace: str, attempt: int, settings: OperatorSettings) -> dict[str, Any]:
    spec = ftj.spec
    r = spec.resources
    name = ftj.metadata.name
    volumes, mounts = _volumes(ftj)
    procs = procs_per_node(ftj)
    ports = [{"name": "rendezvous", "containerPort": spec.distributed.rendezvous_port, "protocol": "TCP"}]
    if spec.metrics.enabled:
        ports += [
            {
                "name": f"metrics-{rank}" if procs > 1 else "metrics",
                "containerPort": spec.metrics.port + rank,
                "protocol": "TCP",
            }
            for rank in range(procs)
        ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": r.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy or r.image_pull_policy,
        "command": pod_command(ftj),
        "env": _env(ftj, namespace, attempt),
        "ports": ports,
        "volumeMounts": mounts,
        "workingDir": IMAGE_ROOT,
        # The last lines of output become the termination message when the trainer dies: the operator
        # copies it into status.lastFailure.message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }
    resources = _resources(ftj)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(name),
        "serviceAccountName": trainer_account_name(name),
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": spec.checkpoint.grace_period_seconds + GRACE_MARGIN_SECONDS,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod_spec["tolerations"] = [t.to_manifest() for t in r.tolerations]
    if r.affinity:
        pod_spec["affinity"] = r.affinity
    if r.priority_class_name:
        pod_spec["priorityClassName"] = r.priority_class_name
    if r.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [s.to_manifest() for s in r.image_pull_secrets]
    return {
        "metadata": {
            "labels": {**r.pod_labels, **labels(ftj, settings, **{LABEL_ATTEMPT: str(attempt)})},
            **({"annotations": dict(r.pod_annotations)} if r.pod_annotations else {}),
        },
        "spec": pod_spec,
    }


def job(
    ftj: FineTuneJob,
    namespace: str,
    uid: str,
    attempt: int,
    settings: OperatorSettings,
    *,
    active_deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """The Indexed Job of one gang attempt.

    Any pod failure fails the whole Job (backoffLimit 0): the operator decides whether to restart the
    gang. Permanent trainer exit codes fail it at once through the podFailurePolicy, with reason
    PodFailurePolicy, which the operator never retries.
    """
    spec = ftj.spec
    nodes = spec.distributed.nodes
    meta = _meta(job_name(ftj.metadata.name, attempt), namespace, ftj, uid, settings)
    meta["labels"][LABEL_ATTEMPT] = str(attempt)
    if spec.run_policy.queue_name:
        meta["labels"][LABEL_KUEUE_QUEUE] = spec.run_policy.queue_name
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "suspend": spec.run_policy.suspend or bool(spec.run_policy.queue_name),
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": sorted(PERMANENT_EXIT_CODES),
                    },
                },
                # Preemption, eviction, node drain: retriable; counted, so the gang fails and the
                # operator restarts it from the newest checkpoint.
                {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": pod_template(ftj, namespace, attempt, settings),
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(int(active_deadline_seconds), 1)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def preflight_env(ftj: FineTuneJob) -> list[dict[str, Any]]:
    """The preflight container's environment: what reaches the job's object store and model hub (the
    storage variables, the credentials, spec.resources.env) as in the gang, and where the termination
    message goes; no rendezvous, no metrics, no job identity (the preflight reports through its
    termination message, not the FineTuneJob's status)."""
    spec = ftj.spec
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/workspace"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG},
    ]
    env += [{"name": var, "value": value} for var, value in storage_environment(spec).items()]
    env += _credentials_env(spec.checkpoint.credentials)
    env += [var.to_manifest() for var in spec.resources.env]
    return env


def preflight_job(
    ftj: FineTuneJob, namespace: str, uid: str, attempt: int, settings: OperatorSettings
) -> dict[str, Any]:
    """The Job of one preflight attempt: one CPU-only pod that checks the data, builds the tokenized cache
    and estimates memory before any GPU is held (``spec.preflight``).

    The trainer image and the gang's ConfigMap, credentials, extra environment, ServiceAccount (for a
    cloud's workload identity; no API token is mounted: the pod never calls the API server), image pull
    secrets and pod labels/annotations; none of the GPU node's scheduling (nodeSelector, tolerations,
    affinity, priority class): it requests no accelerator and runs on any node that has the CPU and
    memory of ``spec.preflight.resources``. Its result is the container's termination message (a
    PreflightResult as JSON, under 4096 bytes); when the container dies before writing one, the last
    lines of its log take its place. backoffLimit 0: the operator decides whether to try again.
    """
    spec = ftj.spec
    r = spec.resources
    name = ftj.metadata.name
    volumes, mounts = _volumes(ftj)
    size = spec.preflight.pod_resources()
    quantities = {"cpu": str(size.cpu), "memory": str(size.memory)}
    container: dict[str, Any] = {
        "name": PREFLIGHT_CONTAINER,
        "image": r.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy or r.image_pull_policy,
        "command": preflight_command(f"{CONFIG_DIR}/{CONFIG_KEY}"),
        "env": preflight_env(ftj),
        "volumeMounts": mounts,
        "workingDir": IMAGE_ROOT,
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": trainer_account_name(name),
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if r.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [s.to_manifest() for s in r.image_pull_secrets]
    pod_labels = {**r.pod_labels, **labels(ftj, settings, **{LABEL_PREFLIGHT: str(attempt)})}
    pod_labels[LABEL_NAME] = "finetune-preflight"
    meta = _meta(preflight_job_name(name, attempt), namespace, ftj, uid, settings)
    meta["labels"][LABEL_PREFLIGHT] = str(attempt)
    meta["labels"][LABEL_NAME] = "finetune-preflight"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 0,
            "activeDeadlineSeconds": spec.preflight.deadline_seconds(),
            "ttlSecondsAfterFinished": PREFLIGHT_TTL_SECONDS,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    **({"annotations": dict(r.pod_annotations)} if r.pod_annotations else {}),
                },
                "spec": pod_spec,
            },
        },
    }


def children(
    ftj: FineTuneJob,
    namespace: str,
    uid: str,
    settings: OperatorSettings,
    dependencies: Sequence[Dependency] = (),
) -> list[dict[str, Any]]:
    """The children that exist for the whole life of the job (the Job itself is per attempt). The
    trainer config's ConfigMap only once the spec's ``ftj://`` models are resolved (``dependencies``):
    nothing that reads it starts before."""
    resolved = {d.field for d in dependencies} >= set(ftj.spec.job_references())
    return [
        *([config_map(ftj, namespace, uid, settings, dependencies)] if resolved else []),
        service(ftj, namespace, uid, settings),
        service_account(ftj, namespace, uid, settings),
        role(ftj, namespace, uid, settings),
        role_binding(ftj, namespace, uid, settings),
    ]


def render(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True)
