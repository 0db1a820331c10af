"""The trainer image's Dockerfile and lock file agree with the package."""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement


def lock(repo: Path) -> dict[str, str]:
    pins = {}
    for line in (repo / "trainer_image" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_pins_every_requirement_within_its_range(repo: Path) -> None:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    pins = lock(repo)
    for spec in project["dependencies"] + project["optional-dependencies"]["trainer"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock: run hack/lock.sh trainer"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


def test_dockerfile_is_pinned_non_root_and_runs_the_launcher(repo: Path) -> None:
    text = (repo / "trainer_image" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base and re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", base.group(1)), base
    assert "requirements.lock" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].isdigit() and int(users[-1]) > 0
    entry = re.search(r"^ENTRYPOINT (\[.*\])", text, re.M)
    assert entry
    argv = json.loads(entry.group(1))
    assert argv[:2] == ["python", "-m"]
    module = importlib.util.find_spec(argv[2])
    assert module is not None and module.origin and module.origin.endswith("launch.py")


def test_operator_image_is_pinned_non_root_and_runs_the_console_script(repo: Path) -> None:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (repo / "operator" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins and req.specifier.contains(pins[name]), f"{name}: run hack/lock.sh operator"
    assert "torch" not in pins, "the operator image must stay small"
    text = (repo / "operator" / "Dockerfile").read_text()
    assert re.search(r"^FROM [\w./-]+:\d+\.\d+\.\d+[\w.-]*$", text, re.M)
    user = re.findall(r"^USER (\d+)(?::\d+)?$", text, re.M)
    assert user and int(user[-1]) > 0
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["finetune-operator"] and project["scripts"]["finetune-operator"]
