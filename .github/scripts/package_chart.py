"""Package the Helm chart for a release: appVersion and version = the tag's version, both images pinned.

    python .github/scripts/package_chart.py --chart charts/finetune-operator --version 0.2.0 \\
        --operator-digest sha256:... --trainer-digest sha256:... --destination dist

The chart is copied, its Chart.yaml gets `version` and `appVersion`, its values.yaml the two digests
(`operator.image.digest`, `trainer.image.digest`: the chart then renders repository@digest), and
`helm package` writes dist/finetune-operator-VERSION.tgz. Standard library only (the release runner's
python). tests/unit/test_release.py runs it and renders the result.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
VERSION = re.compile(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?")


def set_top_level(text: str, key: str, value: str) -> str:
    """Replace the top-level `key:` line of a YAML file; exactly one must exist."""
    pattern = re.compile(rf"^{re.escape(key)}:.*$", re.M)
    new, n = pattern.subn(f'{key}: "{value}"' if key == "appVersion" else f"{key}: {value}", text)
    if n != 1:
        raise SystemExit(f"Chart.yaml: expected one top-level {key!r}, found {n}")
    return new


def set_image_digest(text: str, section: str, digest: str) -> str:
    """Set `<section>.image.digest` in values.yaml (top-level section, 2-space indentation)."""
    lines = text.splitlines(keepends=True)
    in_section = in_image = False
    done = 0
    for i, line in enumerate(lines):
        if re.match(r"^\S", line):
            in_section, in_image = line.startswith(f"{section}:"), False
        elif in_section and re.match(r"^  \S", line):
            in_image = line.startswith("  image:")
        elif in_section and in_image and re.match(r"^    digest:", line):
            lines[i] = f'    digest: "{digest}"\n'
            done += 1
    if done != 1:
        raise SystemExit(f"values.yaml: expected one {section}.image.digest, found {done}")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chart", type=Path, required=True)
    p.add_argument("--version", required=True, help="the release version, without the tag's leading v")
    p.add_argument("--operator-digest", required=True)
    p.add_argument("--trainer-digest", required=True)
    p.add_argument("--destination", type=Path, required=True)
    p.add_argument("--helm", default="helm")
    a = p.parse_args(argv)
    if not VERSION.fullmatch(a.version):
        raise SystemExit(f"--version {a.version!r} is not a semantic version such as 0.2.0")
    for flag, digest in (("--operator-digest", a.operator_digest), ("--trainer-digest", a.trainer_digest)):
        if not DIGEST.fullmatch(digest):
            raise SystemExit(f"{flag} {digest!r} is not a sha256:<64 hex> digest")
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / a.chart.resolve().name
        shutil.copytree(a.chart, chart)
        meta = chart / "Chart.yaml"
        text = set_top_level(meta.read_text(), "version", a.version)
        meta.write_text(set_top_level(text, "appVersion", a.version))
        values = chart / "values.yaml"
        text = set_image_digest(values.read_text(), "operator", a.operator_digest)
        values.write_text(set_image_digest(text, "trainer", a.trainer_digest))
        a.destination.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([a.helm, "package", str(chart), "--destination", str(a.destination)], check=False)
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
