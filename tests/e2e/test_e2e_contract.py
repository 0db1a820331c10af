"""Contract: the pod template the operator renders really trains.

The operator renders a 2-node FineTuneJob on the real control plane. We take the Job's pod template
and ConfigMap as they are and run the container's command and env as two local processes, one per
completion index — the only liberties a laptop needs: the container's volume mounts become local
directories (paths under a mount path are mapped there), `python` is this interpreter, and pod 0's
stable hostname resolves to 127.0.0.1. The two ranks rendezvous with torchrun and finish training.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polling import free_port

if TYPE_CHECKING:
    from conftest import Cluster, Operator

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
import tiny  # noqa: E402


class Mounts:
    """Container paths → local directories, following the pod's volumeMounts."""

    def __init__(self, root: Path, mounts: list[dict[str, Any]]):
        self.table = {m["mountPath"]: root / m["name"] for m in mounts}
        for local in self.table.values():
            local.mkdir(parents=True, exist_ok=True)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            for mount in sorted(self.table, key=len, reverse=True):
                if value == mount or value.startswith(mount + "/"):
                    return str(self.table[mount]) + value[len(mount) :]
                value = value.replace("=" + mount + "/", "=" + str(self.table[mount]) + "/")
            return value
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command arguments."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def test_rendered_pod_template_trains_as_two_processes(
    cluster: Cluster,
    operator: Operator,
    ns: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    model = tiny_model
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(200))
    port = free_port()
    ftj = tiny.job_manifest("gang", model, train, training__maxSteps=6)
    ftj["spec"]["distributed"] = {"nodes": 2, "procsPerNode": 1, "rendezvousPort": port}
    ftj["spec"]["resources"] = {"gpusPerNode": 0, "podAnnotations": {"testcluster.finetune.io/hold": "true"}}
    ftj["spec"]["checkpoint"] = {"uri": f"file://{tmp_path}/storage"}
    ftj["spec"]["metrics"] = {"enabled": False}  # both "pods" share this host's ports
    ftj["spec"]["preflight"] = {"mode": "skip"}  # the gang's Job at once (test_e2e_preflight.py runs the preflight's)
    cluster.apply(ftj, namespace=ns)
    job = cluster.wait_for("the operator's Job", lambda: cluster.get_json("job", "gang-a0", namespace=ns), timeout=60)
    config_map = cluster.get_json("configmap", "gang-config", namespace=ns)
    template = job["spec"]["template"]
    [container] = template["spec"]["containers"]
    # /tmp and /dev/shm are scratch space: this host's own serve (and the test's files live in /tmp).
    mounts = Mounts(
        tmp_path / "volumes", [m for m in container["volumeMounts"] if m["mountPath"] not in ("/tmp", "/dev/shm")]
    )
    config_dir = mounts("/etc/finetune")
    for key, text in config_map["data"].items():
        Path(config_dir, key).write_text(json.dumps(mounts(json.loads(text))))

    procs = []
    for index in range(job["spec"]["completions"]):
        env = {"PATH": os.environ["PATH"], "JOB_COMPLETION_INDEX": str(index)}
        for var in container["env"]:
            if "value" in var:
                env[var["name"]] = mounts(var["value"])
            elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                env[var["name"]] = ns
        env["MASTER_ADDR"] = "127.0.0.1"  # pod 0's hostname, llm-a0-0.<service>, on this host
        argv = [mounts(expand(a, env)) for a in container["command"]]
        assert argv[0] == "python"
        argv[0] = sys.executable
        procs.append(
            subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("the two ranks did not finish within 600 s") from None
        outputs.append(out)
        assert proc.returncode == 0, out[-5000:]
    summary = json.loads((Path(mounts("/workspace/run")) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert Path(f"{tmp_path}/storage/{ns}/gang/output/manifest.json").exists()
