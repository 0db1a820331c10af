"""`finetune report` on runs it cannot read: the error names the file (and the line)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from finetune_operator.cli import main


def test_missing_run_names_the_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert f"{tmp_path / 'nowhere' / 'metrics.jsonl'}: not found" in result.output


def test_bad_record_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "time": 1.0}\n{"step": 2, "loss": \n')
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path / 'metrics.jsonl'}:2: not a JSON record" in result.output


def test_empty_run(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("\n")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no records" in result.output
