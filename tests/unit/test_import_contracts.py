"""The import contracts of pyproject.toml's [tool.importlinter] (run by hack/test.sh as `lint-imports`),
and proof that each one fails on a violating import.

Each check runs `lint-imports` on a copy of both packages (first on PYTHONPATH, so it is what gets
analysed) into which violating imports were written: of existing modules, and of modules that do not
exist yet. A new module cannot slip past a hand-written list: the API and trainer contracts forbid all
of finetune_operator (finetune_operator.*), and the pure-code one forbids the Kubernetes clients
themselves, so a new I/O module is caught through its own imports (indirect imports count).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = {
    c["id"]: c["name"]
    for c in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
}

API = "api-imports-no-operator-module"
PURE = "pure-code-does-no-io"
TRAINER = "trainer-imports-only-the-api"


def overlay(root: Path, edits: dict[str, str]) -> Path:
    """Both packages copied under ``root``, with ``edits``: lines appended to (or new) files."""
    shutil.copytree(
        REPO / "operator" / "finetune_operator",
        root / "finetune_operator",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(
        REPO / "trainer_image" / "finetune_trainer",
        root / "finetune_trainer",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for path, line in edits.items():
        f = root / path
        f.write_text((f.read_text() if f.exists() else "") + f"\n{line}\n")
    return root


def lint(root: Path) -> tuple[dict[str, str], str]:
    """Every contract's verdict (KEPT or BROKEN) on the packages under ``root``, and the report."""
    proc = subprocess.run(
        [str(LINT_IMPORTS), str(REPO / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "1000", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = proc.stdout + proc.stderr
    verdicts = {}
    for cid, name in CONTRACTS.items():
        found = re.search(rf"^{re.escape(name)} (KEPT|BROKEN)", report, re.MULTILINE)
        assert found, f"no verdict for {cid} in:\n{report}"
        verdicts[cid] = found.group(1)
    assert (proc.returncode == 0) == (set(verdicts.values()) == {"KEPT"}), report
    return verdicts, report


def test_the_contracts_are_the_three_of_the_api() -> None:
    # Each contract has its failing cases below: a new contract needs its own.
    assert set(CONTRACTS) == {API, PURE, TRAINER}


def test_the_packages_keep_every_contract(tmp_path: Path) -> None:
    verdicts, _ = lint(overlay(tmp_path, {}))
    assert verdicts == {API: "KEPT", PURE: "KEPT", TRAINER: "KEPT"}


def test_each_contract_fails_on_an_import_of_an_existing_module(tmp_path: Path) -> None:
    verdicts, report = lint(
        overlay(
            tmp_path,
            {
                "finetune_operator/api/base.py": "from finetune_operator import report  # noqa",
                "finetune_operator/reconcile.py": "from finetune_operator import k8s_io  # noqa",
                "finetune_trainer/storage.py": "from finetune_operator import builders  # noqa",
            },
        )
    )
    assert verdicts == {API: "BROKEN", PURE: "BROKEN", TRAINER: "BROKEN"}, report
    for chain in (
        "finetune_operator.api.base -> finetune_operator.report",
        "finetune_operator.reconcile -> finetune_operator.k8s_io",
        "finetune_trainer.storage -> finetune_operator.builders",
    ):
        assert chain in report


def test_each_contract_fails_on_a_new_module_and_on_an_indirect_import(tmp_path: Path) -> None:
    verdicts, report = lint(
        overlay(
            tmp_path,
            {
                "finetune_operator/newmodule.py": "",
                "finetune_operator/api/crd.py": "import finetune_operator.newmodule",
                "finetune_trainer/launch.py": "import finetune_operator.newmodule",
                # builders -> a new module -> kopf: indirect, through a module no list names.
                "finetune_operator/newio.py": "import kopf",
                "finetune_operator/builders.py": "import finetune_operator.newio",
            },
        )
    )
    assert verdicts == {API: "BROKEN", PURE: "BROKEN", TRAINER: "BROKEN"}, report
    for chain in (
        "finetune_operator.api.crd -> finetune_operator.newmodule",
        "finetune_operator.builders -> finetune_operator.newio",
        "finetune_operator.newio -> kopf",
        "finetune_trainer.launch -> finetune_operator.newmodule",
    ):
        assert chain in report
