"""``finetune report``: plots and a text summary of a training run, from its ``metrics.jsonl``.

The trainer's rank 0 appends one JSON record per log event to ``<work dir>/metrics.jsonl``
(finetune_trainer/progress.py): training records (``loss``, ``learning_rate``, ``grad_norm``,
``tokens_per_second`` — the running mean since training began — ``eta_seconds``), evaluation records
(``eval_loss``, ``eval_perplexity``; ``general_*`` for the forgetting check; step 0 is the evaluation
before training), and one final record with ``train_runtime`` and ``train_loss``. Every record has
``time``, ``step``, ``epoch`` and ``total_steps``.

The run may be a local directory (``finetune run --workdir``), the metrics.jsonl file itself, or a
copy of it in object storage (``s3://bucket/prefix``, through fsspec; S3-compatible endpoints from
AWS_ENDPOINT_URL, as the trainer's storage).
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class ReportError(Exception):
    """The run cannot be read: the message names the file (and line)."""


@dataclass
class Series:
    """(step, value) points in file order; a resumed run's steps may go back."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.steps.append(step)
            self.values.append(float(value))

    def __bool__(self) -> bool:
        return bool(self.values)

    def best(self) -> tuple[int, float]:
        finite = [(v, s) for s, v in zip(self.steps, self.values, strict=True) if math.isfinite(v)]
        value, step = min(finite) if finite else (math.nan, -1)
        return step, value


@dataclass
class Run:
    source: str
    records: list[dict[str, Any]]
    loss: Series = field(default_factory=Series)
    eval_loss: Series = field(default_factory=Series)
    eval_perplexity: Series = field(default_factory=Series)
    general_loss: Series = field(default_factory=Series)
    general_perplexity: Series = field(default_factory=Series)
    learning_rate: Series = field(default_factory=Series)
    tokens_per_second: Series = field(default_factory=Series)

    @classmethod
    def from_records(cls, source: str, records: list[dict[str, Any]]) -> Run:
        run = cls(source, records)
        for r in records:
            step = int(r.get("step") or 0)
            if "loss" in r:
                run.loss.add(step, r["loss"])
                run.learning_rate.add(step, r.get("learning_rate"))
                run.tokens_per_second.add(step, r.get("tokens_per_second"))
            for key in ("eval_loss", "eval_perplexity", "general_loss", "general_perplexity"):
                if key in r:
                    getattr(run, key).add(step, r[key])
        return run

    @property
    def steps(self) -> int:
        return max((int(r.get("step") or 0) for r in self.records), default=0)

    @property
    def total_steps(self) -> int:
        return max((int(r.get("total_steps") or 0) for r in self.records), default=0)

    @property
    def duration_seconds(self) -> float:
        times = [float(r["time"]) for r in self.records if isinstance(r.get("time"), (int, float))]
        return max(times) - min(times) if times else 0.0

    @property
    def train_runtime(self) -> float | None:
        runtimes = [float(r["train_runtime"]) for r in self.records if "train_runtime" in r]
        return runtimes[-1] if runtimes else None


def _metrics_uri(location: str) -> str:
    if location.endswith(".jsonl"):
        return location
    return location.rstrip("/") + "/" + METRICS_FILE


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def read_text(uri: str) -> str:
    """A local file, or any fsspec URL (s3:// with the trainer's S3 environment: AWS_ENDPOINT_URL...)."""
    if not _is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ReportError(f"{path}: not found (a run directory holds {METRICS_FILE})") from None
    try:
        fsspec: Any = importlib.import_module("fsspec")
    except ImportError:
        raise ReportError(
            f"{uri}: reading object storage needs fsspec: pip install 'finetune-operator[report]'"
        ) from None
    options: dict[str, Any] = {}
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    try:
        with fsspec.open(uri, "rt", encoding="utf-8", **options) as fh:
            text: str = fh.read()
    except FileNotFoundError:
        raise ReportError(f"{uri}: not found (a run prefix holds {METRICS_FILE})") from None
    except ImportError as exc:
        raise ReportError(f"{uri}: {exc} (s3:// needs s3fs)") from None
    return text


def load(location: str) -> Run:
    uri = _metrics_uri(location)
    records = []
    for number, line in enumerate(read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{uri}:{number}: not a JSON record ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{uri}:{number}: expected a JSON object")
        records.append(record)
    if not records:
        raise ReportError(f"{uri}: no records (did the training log anything yet?)")
    return Run.from_records(uri, records)


def _duration(seconds: float) -> str:
    whole = round(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def summary(run: Run) -> str:
    lines = [f"run: {run.source}"]
    planned = f" of {run.total_steps} planned" if run.total_steps else ""
    lines.append(f"steps: {run.steps}{planned}")
    duration = f"duration: {_duration(run.duration_seconds)}"
    if run.train_runtime is not None:
        duration += f" (training {_duration(run.train_runtime)})"
    lines.append(duration)
    if run.loss:
        best_step, best = run.loss.best()
        lines.append(
            f"train loss: first {run.loss.values[0]:.4f} (step {run.loss.steps[0]}), "
            f"last {run.loss.values[-1]:.4f} (step {run.loss.steps[-1]}), best {best:.4f} (step {best_step})"
        )
    for name, loss, perplexity in (
        ("eval", run.eval_loss, run.eval_perplexity),
        ("general", run.general_loss, run.general_perplexity),
    ):
        if not loss:
            continue
        text = f"{name} loss: first {loss.values[0]:.4f} (step {loss.steps[0]}), last {loss.values[-1]:.4f}"
        if name == "eval":
            best_step, best = loss.best()
            text += f", best {best:.4f} (step {best_step})"
        if perplexity:
            text += f"; perplexity first {perplexity.values[0]:.4f}, last {perplexity.values[-1]:.4f}"
        lines.append(text)
    if run.tokens_per_second:
        lines.append(f"mean tokens/s: {run.tokens_per_second.values[-1]:.1f}")
    return "\n".join(lines)


def plot(run: Run, output: Path) -> list[Path]:
    """Loss, eval loss, learning rate and throughput as PNGs in ``output``; series not logged are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    charts: list[tuple[str, str, list[tuple[str, Series, str]]]] = [
        ("loss.png", "Training loss", [("train loss", run.loss, "-"), ("eval loss", run.eval_loss, "o--")]),
        (
            "eval_loss.png",
            "Evaluation loss",
            [("eval loss", run.eval_loss, "o-"), ("general loss", run.general_loss, "s--")],
        ),
        ("learning_rate.png", "Learning rate", [("learning rate", run.learning_rate, "-")]),
        ("throughput.png", "Throughput (tokens/s, mean since start)", [("tokens/s", run.tokens_per_second, "-")]),
    ]
    written = []
    for name, title, lines in charts:
        if not lines[0][1]:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        for label, series, style in lines:
            if series:
                ax.plot(series.steps, series.values, style, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len([s for _, s, _ in lines if s]) > 1:
            ax.legend()
        fig.tight_layout()
        path = output / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
