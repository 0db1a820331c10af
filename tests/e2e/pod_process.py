"""Pod 0 of a rendered gang Job run as a local process tree, as a container would run it.

kwok runs no containers: a test that needs a real training behind a Job's pod takes the Job's pod
template and ConfigMap as the operator rendered them and runs the container's command and env here
(the liberties of test_e2e_contract: volume mounts become local directories, ``python`` is this
interpreter, rank 0's hostname is 127.0.0.1). :meth:`PodProcess.terminate` plays the kubelet's part
when the pod is deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import bounds
import psutil
import test_e2e_contract as contract
from polling import wait_for

if TYPE_CHECKING:
    from conftest import Cluster


class PodProcess:
    """Pod 0 of a rendered Job, run as a local process tree (its own session, like a container)."""

    def __init__(self, cluster: Cluster, ns: str, job_name: str, tmp_path: Path, extra_env: dict[str, str]):
        job = cluster.wait_for(
            f"Job {job_name}", lambda: cluster.get_json("job", job_name, namespace=ns), timeout=bounds.OPERATOR_S
        )
        ftj = job["metadata"]["labels"]["finetune.io/job"]
        config_map = cluster.get_json("configmap", f"{ftj}-config", namespace=ns)
        [container] = job["spec"]["template"]["spec"]["containers"]
        mounts = contract.Mounts(
            tmp_path / "volumes",
            [m for m in container["volumeMounts"] if m["mountPath"] not in ("/tmp", "/dev/shm")],
        )
        for key, text in config_map["data"].items():
            Path(mounts("/etc/finetune"), key).write_text(json.dumps(mounts(json.loads(text))))
        env = {"PATH": os.environ["PATH"], "JOB_COMPLETION_INDEX": "0"}
        for var in container["env"]:
            if "value" in var:
                env[var["name"]] = mounts(var["value"])
            elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                env[var["name"]] = ns
        env["MASTER_ADDR"] = "127.0.0.1"
        env.update(extra_env)
        argv = [mounts(contract.expand(a, env)) for a in container["command"]]
        assert argv[0] == "python"
        argv[0] = sys.executable
        self.log_path, self.cwd = tmp_path / f"{job_name}-pod.log", tmp_path
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rank(self, rank: int) -> psutil.Process:
        def find() -> psutil.Process | None:
            assert self.proc.poll() is None, f"the pod's process exited {self.proc.returncode}:\n{self.output[-4000:]}"
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error, KeyError):
                    if "--config" in p.cmdline() and p.environ()["RANK"] == str(rank):
                        return p
            return None

        return wait_for(f"trainer rank {rank}", find, timeout=120)

    def terminate(self, timeout: float) -> int:
        """What the kubelet does to a deleted pod's container: SIGTERM to its process, then wait for it
        to exit (the trainer saves its step and exits 85); returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"the pod's process did not exit {timeout:.0f}s after SIGTERM:\n{self.output[-4000:]}"
            ) from exc

    def kill(self) -> None:
        # Every process of this pod, stopped ones included. The ranks run in sessions of their own
        # (torch elastic starts them so) and outlive a killed launcher: find them by the launcher's
        # tree and by the working directory they inherited from it.
        pids = {self.proc.pid}
        with contextlib.suppress(psutil.Error):
            pids |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        for p in psutil.process_iter(["cwd"]):
            if p.info["cwd"] == str(self.cwd):
                pids.add(p.pid)
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                proc.resume()
                proc.kill()
        self.proc.wait(timeout=30)
