"""Every defect of the data is exit 3 with a `file:line: reason`, before the model is ever opened.

Each case runs `finetune run` as a user does (torchrun underneath) with a Python audit hook in every
process (a sitecustomize on PYTHONPATH) that logs each open() or directory listing under the model
directory: the log must stay empty. A control run of the same hook loading the tokenizer shows that
the hook does see such opens.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from finetune_operator.api.trainer_config import EXIT_INVALID_DATA
from runs import RunResult
from tiny import job_manifest, prompt_completion_rows, write_jsonl

AUDIT_HOOK = """
import os, sys

_root = os.environ.get("FINETUNE_AUDIT_ROOT")
_log = os.environ.get("FINETUNE_AUDIT_LOG")
if _root and _log:
    def _audit(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path == _root or path.startswith(_root + os.sep):
                with open(_log, "a", encoding="utf-8") as fh:
                    fh.write(f"{os.getpid()} {event} {path}\\n")
    sys.addaudithook(_audit)
"""


@pytest.fixture
def audited(tmp_path: Path, tiny_model: Path) -> tuple[dict[str, str], Path]:
    """Environment that logs every open under the model directory, and the log."""
    site = tmp_path / "audit-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "model-opens.log"
    env = {
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "FINETUNE_AUDIT_ROOT": str(tiny_model.resolve()),
        "FINETUNE_AUDIT_LOG": str(log),
    }
    return env, log


def test_the_audit_hook_sees_the_model_being_opened(audited: tuple[dict[str, str], Path], tiny_model: Path) -> None:
    env, log = audited
    code = f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({str(tiny_model)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokenizer" in log.read_text(), "the audit hook logged no open of the model's files"


def _last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


def _defect(tmp_path: Path, case: str) -> tuple[Path, dict[str, object], str]:
    """(train path, spec overrides, the line expected last in the output) for each defect."""
    train = tmp_path / "train.jsonl"
    good = [json.dumps(r) for r in prompt_completion_rows(8)]
    if case == "not-utf8":
        train.write_bytes(("\n".join(good[:2]) + "\n").encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n')
        offset = len(("\n".join(good[:2]) + "\n").encode()) + len(b'{"prompt": "caf')
        return train, {}, f"{train}:3: not UTF-8 text: byte 0xe9 at byte offset {offset} cannot be decoded"
    if case == "binary":
        train.write_bytes(gzip.compress(("\n".join(good) + "\n").encode()))
        return train, {}, f"{train}:1: a binary file, not text (NUL byte at byte offset"
    if case == "empty":
        train.write_text("\n\n")
        return train, {}, f"{train}: no records (the data is empty)"
    if case == "eval-split-leaves-nothing":
        write_jsonl(train, prompt_completion_rows(1))
        return train, {"data__evalSplit": 0.5}, f"{train}: spec.data.evalSplit 0.5 holds out 1 of 1 record(s)"
    if case == "missing-file":
        missing = tmp_path / "no-such-dir" / "train.jsonl"
        return missing, {}, f"{missing}: no such file or directory"
    if case == "column-no-record-has":
        write_jsonl(train, prompt_completion_rows(8))
        return (
            train,
            {"data__columns": {"prompt": "instruction"}},
            f"{train}:1: no record has a column 'instruction' (spec.data.columns.prompt for format promptCompletion);"
            " the records' columns: completion, prompt",
        )
    if case == "parquet-unparsable":
        bad = tmp_path / "train.parquet"
        bad.write_text("prompt,completion\nnot,parquet\n")
        return bad, {}, f"{bad}: not a readable Parquet file:"
    if case == "csv-unparsable":
        bad = tmp_path / "train.csv"
        bad.write_text('prompt,completion\n"what color is the apple?,red\nx,y\n')
        return bad, {}, f"{bad}:2: invalid CSV: unexpected end of data"
    if case == "eval-file-broken":
        write_jsonl(train, prompt_completion_rows(8))
        broken = tmp_path / "eval.jsonl"
        broken.write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\n')
        return train, {"data__eval": {"uri": str(broken)}}, f"{broken}:2: not UTF-8 text: byte 0xff at byte offset 35"
    raise AssertionError(case)


DEFECTS = [
    "not-utf8",
    "binary",
    "empty",
    "eval-split-leaves-nothing",
    "missing-file",
    "column-no-record-has",
    "parquet-unparsable",
    "csv-unparsable",
    "eval-file-broken",
]


@pytest.mark.parametrize("case", DEFECTS)
def test_data_defect_exits_3_before_the_model_is_opened(
    tmp_path: Path,
    tiny_model: Path,
    finetune_run: Callable[..., RunResult],
    audited: tuple[dict[str, str], Path],
    case: str,
) -> None:
    env, log = audited
    train, overrides, expected = _defect(tmp_path, case)
    result = finetune_run(job_manifest(f"defect-{case}", tiny_model, train, **overrides), env=env)
    assert result.returncode == EXIT_INVALID_DATA, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    # The clean error is the last thing printed (no torch elastic failure report after it).
    assert _last_line(result.output).startswith(expected), result.output[-3000:]
    assert not log.exists(), f"the model directory was opened:\n{log.read_text()}"
    assert not (result.workdir / "metrics.jsonl").exists()


def _record(logger: logging.Logger, msg: str, *args: object) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.ERROR, "api.py", 1, msg, args, None)


@pytest.mark.parametrize(("code", "kept"), [(1, True), (-11, True), (2, False), (3, False), (4, False), (85, False)])
def test_the_failure_report_stays_only_for_crashes(code: int, kept: bool) -> None:
    """torch elastic's report (and the closing signals after it) is left out after an explained exit
    and kept after a crash, which may be a bug."""
    from finetune_trainer import launch

    api = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    flt = launch.ExplainedExitFilter()
    before = _record(api, "Starting processes %s", 1)
    assert flt.filter(before)
    failed = _record(api, "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", code, 0, 123, "python")
    assert flt.filter(failed) is kept
    assert flt.filter(_record(api, "Sending process %s closing signal %s", 124, "SIGTERM")) is kept


def test_the_filter_is_installed_on_the_logger_that_reports_failures() -> None:
    from finetune_trainer import launch

    api = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    flt = launch.quiet_explained_exits()
    try:
        assert flt in api.filters
    finally:
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(launch.ELASTIC_LOGGERS):
                logging.getLogger(name).removeFilter(flt)
