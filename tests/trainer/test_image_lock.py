"""The trainer image's lock file resolves against the package index (what `docker build` installs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name


def test_lock_resolves(repo: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(tmp_path / "report.json"),
            "-r",
            str(repo / "trainer_image" / "requirements.lock"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    installed = {i["metadata"]["name"].lower() for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert {"torch", "transformers", "peft", "deepspeed", "bitsandbytes", "trl"} <= installed


def test_lock_pins_every_trainer_requirement(repo: Path) -> None:
    """Each requirement of pyproject's [trainer] extra is pinned in the lock, at a version it allows."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extra = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trainer"]
    pins = {}
    for line in (repo / "trainer_image" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for requirement in map(Requirement, extra):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in trainer_image/requirements.lock (hack/lock.sh trainer)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


def test_lock_has_linux_arm64_wheels(repo: Path, tmp_path: Path) -> None:
    """Every package of the lock has a linux/aarch64 wheel (deepspeed, rouge-score and wn excepted: sdists on
    every platform), CUDA's included: the trainer image is linux/amd64 only because that is the platform the
    tests install and train it on (tests/trainer/test_image_steps.py), not for want of a wheel (README,
    .github/workflows/release.yml)."""
    # The base image is Debian bookworm (glibc 2.36); pip expands no manylinux tag it is given.
    platforms = [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)] + ["manylinux2014_aarch64"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-deps",
            "--quiet",
            *(arg for platform in platforms for arg in ("--platform", platform)),
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--target",
            str(tmp_path / "target"),
            "--report",
            str(tmp_path / "report.json"),
            "-r",
            str(repo / "trainer_image" / "requirements.lock"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Names as the lock spells them (PEP 503): an sdist's metadata may say rouge_score for rouge-score.
    files = {
        canonicalize_name(item["metadata"]["name"]): item["download_info"]["url"].rsplit("/", 1)[-1]
        for item in json.loads((tmp_path / "report.json").read_text())["install"]
    }
    not_wheels = {name: file for name, file in files.items() if not file.endswith(".whl")}
    # rouge-score (pure Python) and wn (WordNet's data files) are published as sdists only: they build on any
    # platform.
    assert set(not_wheels) == {"deepspeed", "rouge-score", "wn"}, not_wheels
    assert "aarch64" in files["torch"] and "aarch64" in files["nvidia-nccl-cu13"], files
