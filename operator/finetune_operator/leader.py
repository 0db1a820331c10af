"""Leader election on a ``coordination.k8s.io`` Lease: one replica of the operator acts, the others wait.

The protocol is client-go's (``k8s.io/client-go/tools/leaderelection``), which every Kubernetes
controller uses: the leader writes its identity and a fresh ``renewTime`` into the Lease every
:attr:`Timing.retry_period`; a candidate takes the Lease over (``leaseTransitions`` + 1) once its
record has not changed for :attr:`Timing.lease_duration` as measured on the candidate's own monotonic
clock — never by comparing ``renewTime`` with its wall clock, so clock skew between nodes cannot make
two leaders. Every write carries the resourceVersion it was decided from: of two candidates, the API
server lets one win. A leader that cannot renew for :attr:`Timing.renew_deadline` (shorter than the
lease) stops leading before anyone else may start; one that stops cleanly (SIGTERM) releases the
Lease, so that a standby takes over at once instead of after the lease duration.

Why by hand: kopf's peering pauses lower-priority operators but lets same-priority replicas (a
Deployment's) all run, and the official client's elector is thread-based, outside kopf's event loop.
:func:`decide` is the pure part, tested without a cluster; :class:`LeaderElector` does the I/O
through :class:`~.k8s_io.Kube`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .k8s_io import ApiError, Kube

log = logging.getLogger("finetune_operator")

Decision = Literal["create", "renew", "take", "wait"]


@dataclass(frozen=True)
class Timing:
    """client-go's defaults (kube-controller-manager's): a dead leader is replaced within
    ``lease_duration`` + ``retry_period``."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass
class Observation:
    """What a candidate last saw of the Lease's record, and when (its monotonic clock)."""

    record: tuple[Any, ...] | None = None
    seen_at: float = 0.0


def record_of(lease: Mapping[str, Any]) -> tuple[Any, ...]:
    """The part of a Lease whose change proves its holder alive."""
    spec = lease.get("spec") or {}
    return (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))


def decide(lease: Mapping[str, Any] | None, identity: str, seen: Observation, now: float, timing: Timing) -> Decision:
    """What a candidate does with the Lease as it reads it now (``seen`` is updated in place):
    create it (absent), renew it (its own), take it (released, or unchanged for the lease's duration
    since this candidate first saw it so), or wait (held by a live leader)."""
    if lease is None:
        return "create"
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return "renew"
    if not holder:
        return "take"  # released by a leader that stopped cleanly
    record = record_of(lease)
    if record != seen.record:
        seen.record, seen.seen_at = record, now
        return "wait"
    duration = float(spec.get("leaseDurationSeconds") or timing.lease_duration)
    return "take" if now - seen.seen_at >= duration else "wait"


def _micro_time(t: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One candidate for the Lease ``namespace/name``.

    ``await acquire()`` returns once this candidate leads; ``await hold(lost)`` then renews until it
    cannot (``lost`` is set) or is cancelled; ``await release()`` gives the Lease up.
    """

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        timing: Timing = Timing(),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.timing, self.clock = timing, clock
        self.seen = Observation()
        self.leading = False

    def _lease(self, spec: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace, **(metadata or {})},
            "spec": dict(spec),
        }

    async def try_acquire_or_renew(self) -> bool:
        """One round of the protocol; True when this candidate holds the Lease afterwards."""
        lease = await self.kube.get("Lease", self.namespace, self.name)
        now_wall = datetime.now(UTC)
        decision = decide(lease, self.identity, self.seen, self.clock(), self.timing)
        if decision == "wait":
            return False
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.timing.lease_duration),
            "renewTime": _micro_time(now_wall),
        }
        if decision == "create":
            spec |= {"acquireTime": spec["renewTime"], "leaseTransitions": 0}
            return await self.kube.create_if_absent(self._lease(spec))
        assert lease is not None
        old = lease.get("spec") or {}
        if decision == "renew":
            spec |= {"acquireTime": old.get("acquireTime"), "leaseTransitions": old.get("leaseTransitions") or 0}
        else:  # take
            spec |= {"acquireTime": spec["renewTime"], "leaseTransitions": int(old.get("leaseTransitions") or 0) + 1}
        version = (lease.get("metadata") or {}).get("resourceVersion")
        replaced = await self.kube.replace(self._lease(spec, {"resourceVersion": version}))
        if replaced and decision == "take":
            log.info("took the lease %s/%s over from %s", self.namespace, self.name, old.get("holderIdentity"))
        return replaced

    async def _round(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except ApiError as exc:
            log.warning("leader election: %s", exc)
            return False

    async def acquire(self) -> None:
        """Wait until this candidate leads."""
        log.info("waiting to lead (lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
        while not await self._round():
            await asyncio.sleep(self.timing.retry_period)
        self.leading = True
        log.info("leading (lease %s/%s, identity %s)", self.namespace, self.name, self.identity)

    async def hold(self, lost: asyncio.Event) -> None:
        """Renew every retry period; set ``lost`` (and return) when no renewal succeeded within the
        renew deadline — before the lease expires for the others."""
        last = self.clock()
        while True:
            await asyncio.sleep(self.timing.retry_period)
            if await self._round():
                last = self.clock()
            elif self.clock() - last >= self.timing.renew_deadline:
                self.leading = False
                log.error("lost the lease %s/%s: no renewal for %.0fs", self.namespace, self.name, self.clock() - last)
                lost.set()
                return

    async def release(self) -> None:
        """Give the Lease up (only if still ours), so that a standby takes over at once."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self.kube.get("Lease", self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
            version = (lease.get("metadata") or {}).get("resourceVersion")
            await self.kube.replace(self._lease(spec, {"resourceVersion": version}))
            log.info("released the lease %s/%s", self.namespace, self.name)
        except ApiError as exc:
            log.warning("could not release the lease: %s", exc)
