"""The trainer image's lock file resolves against the package index (what `docker build` installs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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
