"""``finetune report``: plots and a text summary of a training run, from its ``metrics.jsonl``.

The trainer's rank 0 appends one JSON record per log event to ``<work dir>/metrics.jsonl``
(finetune_trainer/progress.py): training records (``loss``, ``learning_rate``, ``grad_norm``,
``tokens_per_second`` — the running mean since training began — ``eta_seconds``), evaluation records
(``eval_loss``, ``eval_perplexity``; ``general_*`` for the forgetting check; step 0 is the evaluation
before training), and one final record with ``train_runtime`` and ``train_loss``. Every record has
``time``, ``step``, ``epoch`` and ``total_steps``.

Scores a task reports (``eval_accuracy``, ``eval_f1``, ``eval_exact_match``: classification and
extractive QA) are summarized and plotted beside the losses. Two files written next to metrics.jsonl
at the end of a run add what a metric line cannot hold: ``evaluation.json`` (the evaluations before and
after training, with a classifier's confusion matrix) and ``trainer-config.json`` (the job's spec: the
class names). From them come a per-class table and ``confusion_matrix.png``.

With the generation metrics (``bleu``, ``rouge``), the series ``eval_bleu`` (0-100, plotted alone in
``bleu.png``) and ``eval_rouge1``/``eval_rouge2``/``eval_rougeL`` (0..1, with the other scores) are
summarized and plotted, and a few of the last evaluation's samples (``samples.jsonl``: prompt,
reference, generation) are shown, for a person to judge what the numbers mean.

The run may be a local directory (``finetune run --workdir``, or the job's output directory), the
metrics.jsonl file itself, or a copy in object storage (``s3://bucket/prefix``, through fsspec;
S3-compatible endpoints from AWS_ENDPOINT_URL, as the trainer's storage).
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
EVALUATION_FILE = "evaluation.json"
CONFIG_FILE = "trainer-config.json"
PROVENANCE_FILE = "provenance.json"
SAMPLES_FILE = "samples.jsonl"
#: The task scores of an evaluation (0..1, higher is better), by their key in metrics.jsonl.
SCORES = {
    "eval_accuracy": "accuracy",
    "eval_f1": "F1",
    "eval_exact_match": "exact match",
    "eval_rouge1": "ROUGE-1",
    "eval_rouge2": "ROUGE-2",
    "eval_rougeL": "ROUGE-L",
}
#: Scores on another scale (higher is better), plotted on their own: sacreBLEU's 0-100.
OWN_SCALE_SCORES = {"eval_bleu": "BLEU"}
#: Samples of generated text the summary shows (the first of samples.jsonl), and the characters of each text.
SHOWN_SAMPLES = 3
SAMPLE_CHARS = 300


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

    def best(self, *, highest: bool = False) -> tuple[int, float]:
        """(step, value) of the lowest value (``highest``: the highest; the first of equal ones)."""
        finite = [(-v if highest else v, s) for s, v in zip(self.steps, self.values, strict=True) if math.isfinite(v)]
        value, step = min(finite) if finite else (math.nan, -1)
        return step, -value if highest else value


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
    #: The task's scores, by their key in metrics.jsonl (those the run logged).
    scores: dict[str, Series] = field(default_factory=dict)
    #: evaluation.json: the task, and the evaluations before and after training (None if absent).
    evaluation: dict[str, Any] | None = None
    #: The class names of a classification job (from trainer-config.json), in class-id order.
    classes: list[str] | None = None
    #: provenance.json: what produced the model (None if absent: a run still training, or an older release).
    provenance: dict[str, Any] | None = None
    #: samples.jsonl: the last evaluation's prompts, references and generations (empty if absent).
    samples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_records(cls, source: str, records: list[dict[str, Any]]) -> Run:
        run = cls(source, records)
        for key in (*SCORES, *OWN_SCALE_SCORES):
            series = Series()
            for r in records:
                if key in r:
                    series.add(int(r.get("step") or 0), r[key])
            if series:
                run.scores[key] = series
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


def _beside(uri: str, name: str) -> dict[str, Any] | None:
    """A JSON file next to metrics.jsonl, or None when there is none (runs of older releases, or a
    run still training) or it is not a JSON object."""
    try:
        data = json.loads(read_text(uri.rsplit("/", 1)[0] + "/" + name if "/" in uri else name))
    except (ReportError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def class_names(config: dict[str, Any] | None) -> list[str] | None:
    """``task.classification.labels`` of a trainer config, or the class ids; None for other tasks."""
    task = ((config or {}).get("spec") or {}).get("task") or {}
    params = task.get("classification") if task.get("type") == "classification" else None
    if not isinstance(params, dict) or not isinstance(params.get("numLabels"), int):
        return None
    labels = params.get("labels")
    return [str(n) for n in labels] if isinstance(labels, list) else [str(i) for i in range(params["numLabels"])]


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
    run = Run.from_records(uri, records)
    run.evaluation = _beside(uri, EVALUATION_FILE)
    run.classes = class_names(_beside(uri, CONFIG_FILE))
    run.provenance = _beside(uri, PROVENANCE_FILE)
    run.samples = _samples(uri)
    return run


def _samples(uri: str) -> list[dict[str, Any]]:
    """The JSON objects of samples.jsonl next to metrics.jsonl (none when it is absent or unreadable)."""
    try:
        text = read_text(uri.rsplit("/", 1)[0] + "/" + SAMPLES_FILE if "/" in uri else SAMPLES_FILE)
    except ReportError:
        return []
    found = []
    for line in text.splitlines():
        try:
            sample = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(sample, dict):
            found.append(sample)
    return found


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
    for key, series in run.scores.items():
        best_step, best = series.best(highest=True)
        lines.append(
            f"eval {({**SCORES, **OWN_SCALE_SCORES})[key]}: first {series.values[0]:.4f} (step {series.steps[0]}), "
            f"last {series.values[-1]:.4f}, best {best:.4f} (step {best_step})"
        )
    if run.tokens_per_second:
        lines.append(f"mean tokens/s: {run.tokens_per_second.values[-1]:.1f}")
    lines.extend(provenance_lines(run.provenance))
    lines.extend(sample_lines(run.samples))
    lines.extend(per_class_table(run))  # last: `finetune report` prints the plots it drew after it
    return "\n".join(lines)


def provenance_lines(provenance: dict[str, Any] | None) -> list[str]:
    """What produced the model, from its provenance.json (status.provenance has the same fields)."""
    if not provenance:
        return []
    lines = ["provenance:"]
    model = provenance.get("model") or {}
    if model:
        ident = model.get("revision") or (f"sha256 {model['sha256']}" if model.get("sha256") else "")
        lines.append(f"  model: {model.get('uri')} {ident}".rstrip())
    for item in provenance.get("data") or []:
        ident = f"sha256 {item['sha256']}" if item.get("sha256") else f"etag {item.get('etag')}"
        lines.append(f"  data ({item.get('role')}): {item.get('uri')} ({item.get('bytes')} B, {ident})")
    for key, label in (
        ("tokenizerSha256", "tokenizer sha256"),
        ("chatTemplateSha256", "chat template sha256"),
        ("seed", "seed"),
        ("checkpointSha256", "last checkpoint manifest sha256"),
        ("image", "trainer image"),
        ("accelerator", "accelerator"),
    ):
        if provenance.get(key) is not None:
            lines.append(f"  {label}: {provenance[key]}")
    libraries = provenance.get("libraries") or {}
    if libraries:
        lines.append("  libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(libraries.items())))
    return lines


def sample_lines(samples: list[dict[str, Any]]) -> list[str]:
    """The first :data:`SHOWN_SAMPLES` samples of generated text: prompt, reference and generation (each
    cut at :data:`SAMPLE_CHARS` characters), with the sample's own scores."""
    if not samples:
        return []
    step = samples[0].get("step")
    at = f" at step {step}" if step is not None else ""
    lines = [f"samples ({min(SHOWN_SAMPLES, len(samples))} of {len(samples)}{at}, {SAMPLES_FILE}):"]

    def text(value: Any) -> str:
        flat = " ".join(str(value).split()) if value is not None else ""
        return flat if len(flat) <= SAMPLE_CHARS else flat[: SAMPLE_CHARS - 1] + "…"

    for sample in samples[:SHOWN_SAMPLES]:
        own = ", ".join(f"{k} {sample[k]:.3f}" for k in ("bleu", "rougeL") if isinstance(sample.get(k), (int, float)))
        lines.append(f"  {sample.get('where', '?')}" + (f" ({own})" if own else ""))
        for key in ("prompt", "reference", "generation"):
            lines.append(f"    {key}: {text(sample.get(key))}")
    return lines


def _evaluations(run: Run) -> list[tuple[str, dict[str, Any]]]:
    """("before"/"after", metrics) of evaluation.json that hold anything."""
    evaluation = run.evaluation or {}
    return [(when, m) for when in ("before", "after") if isinstance(m := evaluation.get(when), dict) and m]


def per_class_table(run: Run) -> list[str]:
    """A classifier's precision, recall and F1 per class after training (and F1 before), as text rows."""
    evaluations = dict(_evaluations(run))
    after = evaluations.get("after")
    if not run.classes or after is None or f"eval_f1_{run.classes[0]}" not in after:
        return []
    before = evaluations.get("before", {})
    width = max(len("class"), *(len(c) for c in run.classes))
    rows = [f"{'class':<{width}}  precision  recall     f1  f1 before"]
    for name in run.classes:
        f1_before = before.get(f"eval_f1_{name}")
        rows.append(
            f"{name:<{width}}  {after[f'eval_precision_{name}']:>9.3f}  {after[f'eval_recall_{name}']:>6.3f}"
            f"  {after[f'eval_f1_{name}']:>5.3f}  {'' if f1_before is None else f'{f1_before:>9.3f}'}".rstrip()
        )
    return ["per class, after training:", *rows]


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
        ("eval_scores.png", "Evaluation scores", [(SCORES[k], v, "o-") for k, v in run.scores.items() if k in SCORES]),
        ("bleu.png", "Evaluation BLEU (0-100)", [("BLEU", run.scores.get("eval_bleu", Series()), "o-")]),
        ("throughput.png", "Throughput (tokens/s, mean since start)", [("tokens/s", run.tokens_per_second, "-")]),
    ]
    written = []
    for name, title, lines in charts:
        if not lines or not lines[0][1]:
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
    matrix = confusion_matrix_plot(run, output, plt)
    if matrix is not None:
        written.append(matrix)
    return written


def confusion_matrix_plot(run: Run, output: Path, plt: Any) -> Path | None:
    """``confusion_matrix.png``, before and after training, each cell with its count; None when the run
    has none. Single-label: one matrix per evaluation (rows: the true class, columns: the predicted
    one). Multi-label: one 2x2 matrix per class and evaluation (rows: the class is absent / present,
    columns: not predicted / predicted), a row of them per evaluation."""
    evaluations = _evaluations(run)
    single = [(when, m["eval_confusion_matrix"]) for when, m in evaluations if "eval_confusion_matrix" in m]
    multi = [(when, m["eval_confusion_matrices"]) for when, m in evaluations if "eval_confusion_matrices" in m]
    if single:
        size = len(single[0][1])
        names = _names(run, size)
        fig, axes = plt.subplots(
            1, len(single), figsize=(4 + 2.5 * len(single) + size * 0.4, 3 + size * 0.4), dpi=100, squeeze=False
        )
        for ax, (when, matrix) in zip(axes[0], single, strict=True):
            _matrix(ax, matrix, f"{when} training", names, names, xlabel="predicted", ylabel="true")
    elif multi:
        size = len(multi[0][1])
        names = _names(run, size)
        fig, axes = plt.subplots(
            len(multi), size, figsize=(1 + 2.2 * size, 0.5 + 2.4 * len(multi)), dpi=100, squeeze=False
        )
        for row, (when, matrices) in zip(axes, multi, strict=True):
            for ax, name, matrix in zip(row, names, matrices, strict=True):
                _matrix(ax, matrix, f"{name} ({when})", ["no", "yes"], ["absent", "present"], xlabel="predicted")
    else:
        return None
    fig.tight_layout()
    path = output / "confusion_matrix.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _names(run: Run, size: int) -> list[str]:
    return run.classes if run.classes and len(run.classes) == size else [str(i) for i in range(size)]


def _matrix(
    ax: Any,
    matrix: list[list[int]],
    title: str,
    columns: list[str],
    rows: list[str],
    *,
    xlabel: str,
    ylabel: str | None = None,
) -> None:
    """One confusion matrix on ``ax``, each cell with its count."""
    ax.imshow(matrix, cmap="Blues")
    ax.set_title(title)
    ax.set_xticks(
        range(len(columns)),
        columns,
        rotation=45 if len(columns) > 2 else 0,
        ha="right" if len(columns) > 2 else "center",
    )
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
