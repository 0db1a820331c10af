"""README's "Install on your cluster", followed word for word on the test control plane.

Every ```bash block of the section runs as written (bash -euo pipefail, from the repository root,
`kubectl` and `helm` on PATH, the test cluster's kubeconfig), in order, except the blocks marked
`<!-- not run by tests/e2e/test_e2e_install_readme.py: REASON -->` (pulling from ghcr.io, building
images, installing the GPU operator, deleting the shared CRD); the build block is checked against the
release workflow instead. The only substitutions are in SUBSTITUTIONS, each required to match the
README exactly once (so the README cannot drift from what is run). kwok runs no containers, so the
operator runs as a local process with the installed Deployment's arguments and only its
ServiceAccount's token (tests/e2e/test_e2e_chart.py's ChartOperator), and the example's pods finish
as kwok finishes Job pods: the job reaches Succeeded, seen in `kubectl get ftj -w`'s own output.
"""

from __future__ import annotations

import copy
import os
import re
import selectors
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bounds
import yaml
from polling import free_port
from test_e2e_chart import ChartOperator, release_objects

if TYPE_CHECKING:
    from conftest import Cluster

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SECTION = "## Install on your cluster"
NOT_RUN = re.compile(r"<!-- not run by tests/e2e/test_e2e_install_readme\.py: (.+?) -->")
RELEASE = "finetune"
SYSTEM = "finetune-system"
DEPLOYMENT = "finetune-finetune-operator"
JOBS_NS = "ml-team"
EXAMPLE = "examples/lora-sft-2-nodes.yaml"
BLOCK_TIMEOUT_S = 300


def section_blocks() -> list[tuple[str, str | None]]:
    """(code, reason it is not run, or None) of every ```bash block in the section."""
    text = README.read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    blocks = []
    for m in re.finditer(r"(?:^(<!--.*?-->)\n)?^```bash\n(.*?)^```$", body, re.M | re.S):
        marker = NOT_RUN.fullmatch(m.group(1)) if m.group(1) else None
        assert m.group(1) is None or marker, f"unrecognised marker before a block: {m.group(1)}"
        blocks.append((m.group(2), marker.group(1) if marker else None))
    return blocks


def fitted_example(path: Path) -> Path:
    """The example with what kwok nodes offer (32 CPUs, 256Gi, 8 GPUs, gpu.present) and without the
    preflight (kwok runs no containers: no preflight pod could read the data; tests/e2e/test_e2e_preflight.py
    drives one), nothing else changed."""
    job: dict[str, Any] = copy.deepcopy(yaml.safe_load((REPO / EXAMPLE).read_text()))
    assert job["metadata"]["namespace"] == JOBS_NS
    job["spec"]["resources"].update(
        cpu=1, memory="1Gi", sharedMemory="1Gi", gpusPerNode=2, nodeSelector={"nvidia.com/gpu.present": "true"}
    )
    job["spec"]["preflight"] = {"mode": "skip"}
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def substitute(blocks: list[tuple[str, str | None]], subs: dict[str, str]) -> list[tuple[str, str | None]]:
    joined = "\n".join(code for code, _ in blocks)
    for old in subs:
        assert joined.count(old) == 1, f"README install section: expected {old!r} exactly once"
    out = []
    for code, reason in blocks:
        for old, new in subs.items():
            code = code.replace(old, new)
        out.append((code, reason))
    return out


def release_builds() -> set[tuple[str, str]]:
    """(dockerfile, platforms) of each image the release workflow builds."""
    release = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    return {
        (s["with"]["dockerfile"], s["with"]["platforms"])
        for job in release["jobs"].values()
        for s in job.get("steps", [])
        if s.get("uses") == "./.github/actions/image"
    }


class Shell:
    def __init__(self, cluster: Cluster, prelude: str):
        self.prelude = prelude
        tools = {str(cluster.kubectl_path.parent), str(cluster.helm_path.parent)}
        self.env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        self.env["PATH"] = os.pathsep.join([*sorted(tools), self.env["PATH"]])

    def argv(self, code: str) -> list[str]:
        return ["bash", "-euo", "pipefail", "-c", f"{self.prelude}\n{code}"]

    def run(self, code: str) -> str:
        proc = subprocess.run(
            self.argv(code), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
        )
        assert proc.returncode == 0, (
            f"README block failed (exit {proc.returncode}):\n{code}\n{proc.stdout}{proc.stderr}"
        )
        return proc.stdout

    def run_until(self, code: str, pattern: str, timeout: float) -> str:
        """Run a block that does not end (`kubectl get -w`) until its output matches `pattern`."""
        proc = subprocess.Popen(
            self.argv(code), cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        out: list[str] = []
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break  # the block ended
                out.append(line)
                if re.search(pattern, line):
                    return "".join(out)
            raise AssertionError(
                f"README block: no line matching {pattern!r} within {timeout:.0f}s (exit {proc.poll()}):\n"
                f"{code}\n{''.join(out)}"
            )
        finally:
            proc.kill()
            proc.wait(timeout=10)


def test_readme_install_section_word_for_word(cluster: Cluster, tmp_path: Path) -> None:
    blocks = section_blocks()
    skipped = [(code, reason) for code, reason in blocks if reason]
    assert len(skipped) == 4, [reason for _, reason in skipped]

    # The build commands build what the release builds, for the same platforms.
    (build,) = [code for code, _ in skipped if "docker buildx build" in code]
    built = {
        (m.group(2), m.group(1))
        for m in re.finditer(r"docker buildx build --platform (\S+) -f (\S+) -t \S+ --push \.", build)
    }
    assert built == release_builds(), f"README builds {built}, the release workflow {release_builds()}"

    metrics_port, health_port = free_port(), free_port()
    subs = {
        # The local operator's ports: free ones on this machine, not the chart's 8080/8081.
        f"helm install {RELEASE} charts/finetune-operator": (
            f"helm install {RELEASE} charts/finetune-operator "
            f"--set operator.metricsPort={metrics_port} --set operator.healthPort={health_port}"
        ),
        # The example as kwok's nodes can schedule it (sizes and GPU node selector).
        f"kubectl apply -f {EXAMPLE}": f"kubectl apply -f {fitted_example(tmp_path / 'example.yaml')}",
    }
    run = [code for code, reason in substitute(blocks, subs) if reason is None]
    variables, install, example, upgrade, uninstall = run
    assert "export REGISTRY=" in variables and "helm install" in install and "kubectl get ftj" in example
    sh = Shell(cluster, variables)
    registry = sh.run('echo "$REGISTRY"').strip()
    version = sh.run('echo "$VERSION"').strip()

    op: ChartOperator | None = None
    try:
        sh.run(install)
        deployment = cluster.get_json("deployment", DEPLOYMENT, namespace=SYSTEM)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"{registry}/operator:{version}"
        assert f"--trainer-image={registry}/trainer:{version}" in container["args"]

        op = ChartOperator(cluster, SYSTEM, DEPLOYMENT, tmp_path)
        op.start()
        watched = sh.run_until(example, r"\bSucceeded\b", timeout=bounds.PODS_RUNNING_S + bounds.PHASE_S)
        assert "llama-lora-sft" in watched, watched
        job = cluster.ftj_status(JOBS_NS, "llama-lora-sft")
        assert job["phase"] == "Succeeded", job
        assert not op.rbac_denials(), "\n".join(op.rbac_denials())
        op.stop()

        sh.run(upgrade)
        new_version = sh.run(upgrade.split("\n", 1)[0] + '\necho "$VERSION"').strip()
        assert new_version != version
        (container,) = cluster.get_json("deployment", DEPLOYMENT, namespace=SYSTEM)["spec"]["template"]["spec"][
            "containers"
        ]
        assert container["image"] == f"{registry}/operator:{new_version}", "helm upgrade kept --reuse-values"
        assert f"--trainer-image={registry}/trainer:{new_version}" in container["args"]

        sh.run(uninstall)
        left = release_objects(cluster, RELEASE)
        assert not left, f"helm uninstall left {left}"
        crd = cluster.get_json("crd", "finetunejobs.finetune.io")
        assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
        assert cluster.get_json("ftj", "llama-lora-sft", namespace=JOBS_NS), "FineTuneJobs survive an uninstall"
    finally:
        if op is not None:
            op.stop()
        # Already gone when the test got that far; otherwise a failure above left it installed.
        subprocess.run(
            [str(cluster.helm_path), f"--kubeconfig={cluster.kubeconfig}", "uninstall", RELEASE, "-n", SYSTEM],
            capture_output=True,
            timeout=120,
            check=False,
        )
        cluster.kubectl("delete", "namespace", SYSTEM, JOBS_NS, "--wait=false", "--ignore-not-found", check=False)
