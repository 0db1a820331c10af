"""``finetune-operator``: run the operator in a cluster (service account) or outside (kubeconfig)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import uuid
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import start_http_server

from . import builders, k8s_io
from .leader import LeaderElector

log = logging.getLogger("finetune_operator")

DEFAULT_METRICS_PORT = 8080
DEFAULT_HEALTH_PORT = 8081


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="Watch this namespace (repeatable).")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="Watch every namespace (default).")
    parser.add_argument(
        "--trainer-image",
        default=builders.OperatorSettings.trainer_image,
        help="Image of the trainer pods (a job's spec.resources.image overrides it).",
    )
    parser.add_argument(
        "--image-pull-policy",
        choices=["Always", "IfNotPresent", "Never"],
        help="Override every job's spec.resources.imagePullPolicy.",
    )
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Prometheus /metrics port.")
    parser.add_argument(
        "--health-port", type=int, default=DEFAULT_HEALTH_PORT, help="Liveness/readiness endpoint port (/healthz)."
    )
    parser.add_argument("--kubeconfig", help="Kubeconfig outside a cluster (default: KUBECONFIG, ~/.kube/config).")
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="Run as one of several replicas: only the holder of a Lease reconciles; the others wait to take over.",
    )
    parser.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE"),
        help="Namespace of the Lease (default: POD_NAMESPACE, the operator's own namespace in a pod).",
    )
    parser.add_argument("--leader-election-name", default="finetune-operator", help="Name of the Lease.")
    parser.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    args = parser.parse_args(argv)
    if args.leader_elect and not args.leader_election_namespace:
        parser.error("--leader-elect needs --leader-election-namespace (or POD_NAMESPACE)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from . import handlers, sweep_handlers  # registers the kopf handlers

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf reports every handler run; the operator logs what matters (phase changes, errors).
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if not args.namespace:
        handlers.watch_nodes()
    kube = k8s_io.Kube()
    operator_settings = builders.OperatorSettings(
        trainer_image=args.trainer_image, image_pull_policy=args.image_pull_policy
    )
    start_http_server(args.metrics_port)

    @kopf.on.startup()
    async def configure(settings: kopf.OperatorSettings, **_: object) -> None:
        # The operator posts its own events on phase transitions; not one per handler run.
        settings.posting.enabled = False
        settings.persistence.diffbase_storage = handlers.NoDiffBaseStorage()
        settings.watching.server_timeout = 300
        # Watching listed namespaces: serve exactly those, with no cluster-wide namespace or CRD
        # watches, so that a Role in each namespace is all the operator needs (the chart's
        # rbac.scope=namespaces). Without this kopf retries the forbidden namespace list for minutes
        # before it serves anything.
        settings.scanning.disabled = bool(args.namespace)
        # Watch only the Jobs and pods this operator made (server-side selection).
        children = f"{builders.LABEL_MANAGED_BY}={builders.MANAGER},{builders.LABEL_JOB}"
        settings.watching.label_selectors["batch", "v1", "jobs"] = children
        settings.watching.label_selectors["", "v1", "pods"] = children
        handlers.start(kube, operator_settings)
        sweep_handlers.start()

    @kopf.on.login()
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = k8s_io.login(**kwargs)
        if info is not None:
            kube.use(info)
        return info

    @kopf.on.cleanup()
    async def cleanup(**_: object) -> None:
        await sweep_handlers.stop()
        await handlers.stop()

    options: dict[str, Any] = {
        "standalone": True,
        "clusterwide": not args.namespace,
        "namespaces": args.namespace,
        "liveness_endpoint": f"http://0.0.0.0:{args.health_port}/healthz",
    }
    if not args.leader_elect:
        kopf.run(**options)
        return
    if not asyncio.run(elected(args, options)):
        sys.exit(1)  # the lease was lost: restarted, this replica waits as a standby


async def standby_health(port: int) -> web.AppRunner:
    """/healthz while this replica waits for the lease (kopf serves it once the operator runs)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="standby")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def elected(args: argparse.Namespace, options: dict[str, Any]) -> bool:
    """Wait for the lease, then run the operator while holding it (:mod:`.leader`). False when the
    lease was lost (the operator stopped before another replica could take over); True after a
    clean stop (SIGTERM), which releases the lease for a standby to take at once."""
    health = await standby_health(args.health_port)
    info = k8s_io.login(settings=kopf.OperatorSettings(), logger=log)
    if info is None:
        raise SystemExit("no credentials: neither a service account nor a kubeconfig")
    lease_kube = k8s_io.Kube(info, max_connections=2)
    identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    elector = LeaderElector(lease_kube, args.leader_election_namespace, args.leader_election_name, identity)
    lost, stop = asyncio.Event(), asyncio.Event()
    try:
        await elector.acquire()
        await health.cleanup()  # the port is kopf's from here on
        holding = asyncio.create_task(elector.hold(lost))
        stopper = asyncio.create_task(lost.wait())
        stopper.add_done_callback(lambda _: stop.set())
        try:
            await kopf.operator(**options, stop_flag=stop)
        finally:
            holding.cancel()
            stopper.cancel()
        if not lost.is_set():
            await elector.release()
    finally:
        await health.cleanup()  # a no-op once cleaned up
        await lease_kube.close()
    return not lost.is_set()


if __name__ == "__main__":
    main()
