"""The one module that talks to the Kubernetes API (through the official Python client).

Everything returns and accepts plain dicts in the API's own camelCase form, so the pure builders and
the reconcile plan never see client objects. 404 on read means "absent"; 409 on create means "already
there" (creation is idempotent). Every other ApiException propagates, counted in the operator's
API-error metric: the handler turns it into a retry.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import metrics
from .api.v1alpha1 import GROUP, PLURAL, VERSION
from .builders import LABEL_JOB, MANAGER

T = TypeVar("T")


def load_config(kubeconfig: str | None = None) -> None:
    """In a pod: the service account; elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]


def _counted(verb: str, resource: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> T:
            metrics.API_REQUESTS.labels(verb=verb, resource=resource).inc()
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status not in (404, 409):
                    metrics.API_ERRORS.labels(verb=verb, resource=resource, code=str(exc.status)).inc()
                raise

        return inner

    return wrap


class Kube:
    def __init__(self) -> None:
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _dict(self, obj: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        return data

    # -- FineTuneJobs -------------------------------------------------------------------------------

    @_counted("get", "finetunejobs")
    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = cast(
                dict[str, Any], self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    @_counted("patch", "finetunejobs/status")
    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    @_counted("delete", "finetunejobs")
    def delete_finetunejob(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- children -----------------------------------------------------------------------------------

    def ensure(self, obj: dict[str, Any]) -> bool:
        """Create ``obj`` unless it exists; a ConfigMap whose data differs is replaced. True if changed."""
        kind = obj["kind"]
        namespace = obj["metadata"]["namespace"]
        name = obj["metadata"]["name"]
        create, read, replace = self._verbs(kind)
        try:
            create(namespace, obj)
            metrics.CHILDREN_CREATED.labels(kind=kind).inc()
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise
        if replace is not None:
            current = self._dict(read(name, namespace))
            if current.get("data") != obj.get("data"):
                replace(name, namespace, {**obj, "metadata": {**obj["metadata"], **_keep(current)}})
                return True
        return False

    def _verbs(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any] | None]:
        core, rbac, batch = self.core, self.rbac, self.batch
        table: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any] | None]] = {
            "ConfigMap": (
                _counted("create", "configmaps")(core.create_namespaced_config_map),
                _counted("get", "configmaps")(core.read_namespaced_config_map),
                _counted("update", "configmaps")(core.replace_namespaced_config_map),
            ),
            "Service": (
                _counted("create", "services")(core.create_namespaced_service),
                core.read_namespaced_service,
                None,
            ),
            "ServiceAccount": (
                _counted("create", "serviceaccounts")(core.create_namespaced_service_account),
                _counted("get", "serviceaccounts")(core.read_namespaced_service_account),
                None,
            ),
            "Role": (
                _counted("create", "roles")(rbac.create_namespaced_role),
                _counted("get", "roles")(rbac.read_namespaced_role),
                None,
            ),
            "RoleBinding": (
                _counted("create", "rolebindings")(rbac.create_namespaced_role_binding),
                _counted("get", "rolebindings")(rbac.read_namespaced_role_binding),
                None,
            ),
            "Job": (
                _counted("create", "jobs")(batch.create_namespaced_job),
                _counted("get", "jobs")(batch.read_namespaced_job),
                None,
            ),
        }
        return table[kind]

    @_counted("list", "jobs")
    def list_jobs(self, namespace: str, ftj: str) -> list[dict[str, Any]]:
        items = self.batch.list_namespaced_job(namespace, label_selector=f"{LABEL_JOB}={ftj}").items
        return [self._dict(j) for j in items]

    @_counted("list", "pods")
    def list_pods(self, namespace: str, ftj: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_pod(namespace, label_selector=f"{LABEL_JOB}={ftj}").items
        return [self._dict(p) for p in items]

    @_counted("delete", "jobs")
    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    @_counted("patch", "jobs")
    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})

    @_counted("create", "events")
    def event(self, ftj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = ftj["metadata"]
        now = datetime.now(UTC)
        self.core.create_namespaced_event(
            meta["namespace"],
            cast(
                Any,
                {
                    "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
                    "involvedObject": {
                        "apiVersion": ftj["apiVersion"],
                        "kind": ftj["kind"],
                        "name": meta["name"],
                        "namespace": meta["namespace"],
                        "uid": meta["uid"],
                    },
                    "type": kind,
                    "reason": reason,
                    "message": message[:1024],
                    "source": {"component": MANAGER},
                    "firstTimestamp": now.isoformat(),
                    "lastTimestamp": now.isoformat(),
                    "count": 1,
                    "reportingComponent": MANAGER,
                },
            ),
        )


def _keep(current: dict[str, Any]) -> dict[str, Any]:
    meta = current.get("metadata") or {}
    return {"resourceVersion": meta.get("resourceVersion")}
