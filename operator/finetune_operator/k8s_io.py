"""The one module that talks to the Kubernetes API: a small asyncio client on aiohttp.

It speaks plain dicts in the API's own camelCase JSON, so the pure builders and the reconcile plan
never see client objects, and it runs in kopf's event loop: no thread pool, no generated models
(the official client's models cost memory and CPU per object at a thousand jobs). Credentials come
from kopf's login (:func:`login`): a service account in a pod, a kubeconfig elsewhere.

404 on read or delete means "absent"; 409 on create means "already there" (creation is
idempotent); 409 on a status patch means the object changed since it was read (the patch carries
its resourceVersion) and the caller reconciles again from the newer object. Every other error
raises :class:`ApiError`, counted in the operator's API-error metric.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
import yaml

from . import __version__, metrics
from .api.sweep import PLURAL as SWEEP_PLURAL
from .api.v1alpha1 import GROUP, PLURAL, VERSION
from .builders import KUEUE_GROUP, KUEUE_VERSION, MANAGER

log = logging.getLogger("finetune_operator")

#: kind → (API path prefix, plural) of everything the operator reads or writes.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Event": ("/api/v1", "events"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("/apis/batch/v1", "jobs"),
    "FineTuneJob": (f"/apis/{GROUP}/{VERSION}", PLURAL),
    "FineTuneSweep": (f"/apis/{GROUP}/{VERSION}", SWEEP_PLURAL),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    "Workload": (f"/apis/{KUEUE_GROUP}/{KUEUE_VERSION}", "workloads"),
}
#: Children whose content the operator keeps in line with the spec (replaced when it differs).
REPLACEABLE = {"ConfigMap"}
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A Kubernetes API request failed with something other than the expected 404/409."""

    def __init__(self, verb: str, resource: str, status: int, reason: str, message: str):
        super().__init__(f"{verb} {resource}: HTTP {status} {reason}: {message}")
        self.verb, self.resource, self.status, self.reason, self.message = verb, resource, status, reason, message


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials for kopf and for :class:`Kube`: the pod's service account, else the kubeconfig.

    kopf's own readers cover tokens, client certificates and basic auth; a kubeconfig that needs an
    exec or auth-provider plugin (cloud logins) goes through the official client, when installed.
    """
    info = kopf.login_with_service_account(**kwargs)
    if info is None:
        if _kubeconfig_needs_plugin():
            return kopf.login_via_client(**kwargs)
        info = kopf.login_with_kubeconfig(**kwargs)
    return info


def _kubeconfig_needs_plugin() -> bool:
    paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p] or ["~/.kube/config"]
    for path in paths:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
        except OSError:
            continue
        for user in config.get("users") or []:
            if {"exec", "auth-provider"} & set(user.get("user") or {}):
                return True
    return False


class Kube:
    """API I/O for the reconciler. At most ``max_connections`` requests are in flight at once."""

    def __init__(self, info: kopf.ConnectionInfo | None = None, *, max_connections: int = 32):
        self.info = info
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Task[None] | None = None

    def use(self, info: kopf.ConnectionInfo) -> None:
        """New credentials (kopf logged in again after a 401): the next request uses them."""
        self.info = info
        if self._session is not None:
            old, self._session = self._session, None
            self._closing = asyncio.get_running_loop().create_task(old.close())

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            info = self.info
            assert info is not None, "no credentials yet: kopf logs in before any handler runs"
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, ssl=info.as_ssl_context()),
                headers={**info.as_http_headers(), "User-Agent": f"finetune-operator/{__version__}"},
                proxy=info.proxy_url,
                trust_env=info.trust_env,
                timeout=aiohttp.ClientTimeout(total=60),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        verb: str,
        resource: str,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (),
    ) -> tuple[int, dict[str, Any]]:
        """One request; returns (status, decoded body). Statuses in ``ok`` are returned, not raised."""
        metrics.API_REQUESTS.labels(verb=verb, resource=resource).inc()
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else None
        client = self._client()
        url = str(self.info.server).rstrip("/") + path  # type: ignore[union-attr]
        try:
            async with client.request(method, url, data=data, headers=headers, params=params) as resp:
                raw, status = await resp.read(), resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            metrics.API_ERRORS.labels(verb=verb, resource=resource, code="connection").inc()
            raise ApiError(verb, resource, 0, type(exc).__name__, str(exc) or repr(exc)) from exc
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"message": raw[:1000].decode(errors="replace")}
        if not isinstance(payload, dict):
            payload = {}
        if status < 300 or status in ok:
            return status, payload
        metrics.API_ERRORS.labels(verb=verb, resource=resource, code=str(status)).inc()
        raise ApiError(verb, resource, status, str(payload.get("reason", "")), str(payload.get("message", "")))

    @staticmethod
    def _path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural = RESOURCES[kind]
        return "/".join(p for p in (prefix, "namespaces", namespace, plural, name, sub) if p)

    # -- FineTuneJobs -------------------------------------------------------------------------------

    async def patch_status(
        self,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None,
        kind: str = "FineTuneJob",
    ) -> dict[str, Any] | None:
        """Merge ``status`` into the FineTuneJob's (or FineTuneSweep's) status if it is still at
        ``resource_version``.

        Returns the updated object, or None when it changed in the meantime (409) or is gone (404).
        """
        patch: dict[str, Any] = {"status": status}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        code, obj = await self._request(
            "PATCH",
            self._path(kind, namespace, name, "status"),
            verb="patch",
            resource=f"{RESOURCES[kind][1]}/status",
            body=patch,
            content_type=MERGE_PATCH,
            ok=(404, 409),
        )
        return obj if code < 300 else None

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge ``patch`` into the object (a sweep's mark and suspension of a pruned trial); False when
        it is gone (404)."""
        code, _ = await self._request(
            "PATCH",
            self._path(kind, namespace, name),
            verb="patch",
            resource=RESOURCES[kind][1],
            body=patch,
            content_type=MERGE_PATCH,
            ok=(404,),
        )
        return code < 300

    async def delete_finetunejob(self, namespace: str, name: str) -> None:
        await self.delete("FineTuneJob", namespace, name)

    async def served_resources(self, group_version_path: str) -> list[str]:
        """The resources (plurals) the API server serves under ``/apis/GROUP/VERSION`` (discovery);
        empty when the group version is not served."""
        code, body = await self._request("GET", group_version_path, verb="get", resource="discovery", ok=(404,))
        return [r["name"] for r in body.get("resources") or [] if code < 300 and "name" in r]

    # -- any object (the leader election's Lease) ----------------------------------------------------

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when absent."""
        code, obj = await self._request(
            "GET", self._path(kind, namespace, name), verb="get", resource=RESOURCES[kind][1], ok=(404,)
        )
        return obj if code < 300 else None

    async def create_if_absent(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False when one of its name exists already (someone else created it first)."""
        kind, meta = obj["kind"], obj["metadata"]
        code, _ = await self._request(
            "POST", self._path(kind, meta["namespace"]), verb="create", resource=RESOURCES[kind][1], body=obj, ok=(409,)
        )
        return code < 300

    async def replace(self, obj: dict[str, Any]) -> bool:
        """Replace ``obj`` if it is still at the resourceVersion in its metadata; False when it changed
        in the meantime (409) or is gone (404)."""
        kind, meta = obj["kind"], obj["metadata"]
        code, _ = await self._request(
            "PUT",
            self._path(kind, meta["namespace"], meta["name"]),
            verb="update",
            resource=RESOURCES[kind][1],
            body=obj,
            ok=(404, 409),
        )
        return code < 300

    # -- children -----------------------------------------------------------------------------------

    async def ensure(self, obj: dict[str, Any]) -> bool:
        """Create ``obj`` unless it exists; a ConfigMap whose data differs is replaced. True if changed."""
        kind, meta = obj["kind"], obj["metadata"]
        plural = RESOURCES[kind][1]
        code, _ = await self._request(
            "POST", self._path(kind, meta["namespace"]), verb="create", resource=plural, body=obj, ok=(409,)
        )
        if code != 409:
            metrics.CHILDREN_CREATED.labels(kind=kind).inc()
            return True
        if kind not in REPLACEABLE:
            return False
        path = self._path(kind, meta["namespace"], meta["name"])
        _, current = await self._request("GET", path, verb="get", resource=plural)
        if current.get("data") == obj.get("data"):
            return False
        version = (current.get("metadata") or {}).get("resourceVersion")
        replacement = {**obj, "metadata": {**meta, "resourceVersion": version}}
        await self._request("PUT", path, verb="update", resource=plural, body=replacement)
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete in the background (dependents go by owner references); absent is fine."""
        await self._request(
            "DELETE",
            self._path(kind, namespace, name),
            verb="delete",
            resource=RESOURCES[kind][1],
            body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            ok=(404,),
        )

    async def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        await self._request(
            "PATCH",
            self._path("Job", namespace, name),
            verb="patch",
            resource="jobs",
            body={"spec": {"suspend": suspend}},
            content_type=MERGE_PATCH,
        )

    async def set_workload_active(self, namespace: str, name: str, active: bool) -> None:
        """Let Kueue admit a Workload again, or evict it (how a queued job is suspended); gone is fine."""
        await self._request(
            "PATCH",
            self._path("Workload", namespace, name),
            verb="patch",
            resource="workloads",
            body={"spec": {"active": active}},
            content_type=MERGE_PATCH,
            ok=(404,),
        )

    async def event(self, ftj: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        meta = ftj["metadata"]
        now = datetime.now(UTC).isoformat()
        await self._request(
            "POST",
            self._path("Event", meta["namespace"]),
            verb="create",
            resource="events",
            body={
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": ftj["apiVersion"],
                    "kind": ftj["kind"],
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                    "resourceVersion": meta.get("resourceVersion"),
                },
                "type": kind,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": MANAGER},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "reportingComponent": MANAGER,
            },
        )
