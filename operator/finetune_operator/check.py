"""``finetune-operator-check``: what the chart's ``helm test`` pod runs — is the operator up, and is the
FineTuneJob API served?

1. The operator's ``/healthz`` answers 200 (polled until ``--timeout``: a replica may be starting). Any
   replica answers: the leader (kopf's liveness endpoint) or a standby.
2. The API server serves ``finetune.io/v1alpha1`` with the ``finetunejobs`` resource (API discovery,
   which every authenticated identity may read: the check needs no RBAC of its own).

Prints one line per check; exits 0 when both pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import urllib.error
import urllib.request

import kopf

from . import k8s_io
from .api.v1alpha1 import GROUP, PLURAL, VERSION

log = logging.getLogger("finetune_operator")


def check_health(url: str, timeout: float) -> str:
    """The body of the first 200 from ``url`` within ``timeout`` seconds; raises RuntimeError after."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body: str = resp.read(200).decode(errors="replace").strip()
                if resp.status == 200:
                    return body
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{url}: {last} (for {timeout:.0f}s)")
        time.sleep(1.0)


async def check_api() -> list[str]:
    """The resources the API server serves in the FineTuneJob's group version (discovery)."""
    info = k8s_io.login(settings=kopf.OperatorSettings(), logger=log)
    if info is None:
        raise RuntimeError("no credentials: neither a service account nor a kubeconfig")
    kube = k8s_io.Kube(info, max_connections=1)
    try:
        return await kube.served_resources(f"/apis/{GROUP}/{VERSION}")
    finally:
        await kube.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune-operator-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--health-url", required=True, help="The operator's /healthz URL (its Service).")
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds to wait for /healthz.")
    args = parser.parse_args(argv)
    ok = True
    try:
        print(f"ok: the operator is healthy ({args.health_url}: {check_health(args.health_url, args.timeout)})")
    except RuntimeError as exc:
        print(f"FAIL: the operator is not healthy: {exc}")
        ok = False
    try:
        served = asyncio.run(check_api())
    except (RuntimeError, k8s_io.ApiError) as exc:
        print(f"FAIL: {GROUP}/{VERSION} is not served: {exc}")
        ok = False
    else:
        if PLURAL in served:
            print(f"ok: the API server serves {PLURAL}.{GROUP}/{VERSION}")
        else:
            print(f"FAIL: {GROUP}/{VERSION} is served without {PLURAL} (it has {', '.join(served) or 'nothing'})")
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
