"""``finetune plan``'s report: a preflight result (``status.preflight``) as text, pure functions."""

from __future__ import annotations

from .api.memory import memory_breakdown
from .api.v1alpha1 import FineTuneJobSpec, PreflightResult


def _n(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def data_lines(result: PreflightResult, spec: FineTuneJobSpec) -> list[str]:
    """The records, token lengths and epoch of a result."""
    lines = [
        f"data: {_n(result.train_records)} training records, {_n(result.eval_records)} evaluation records, "
        f"{result.bad_records:,} bad"
    ]
    if result.token_length_max is not None:
        truncated = result.truncated_fraction or 0.0
        lines.append(
            f"tokens per training record: p50 {_n(result.token_length_p50)}, p95 {_n(result.token_length_p95)}, "
            f"max {_n(result.token_length_max)}; {truncated:.1%} cut at spec.data.maxSeqLength "
            f"{spec.data.max_seq_length}"
        )
    if result.steps_per_epoch is not None:
        planned = spec.training.max_steps
        lines.append(
            f"one epoch: {_n(result.tokens_per_epoch)} tokens, {_n(result.steps_per_epoch)} optimizer steps"
            + (f" ({planned:,} steps planned: spec.training.maxSteps)" if planned else "")
        )
    if result.cache_uri:
        lines.append(f"tokenized cache: {result.cache_uri} ({'reused' if result.cache_hit else 'written'})")
    return lines


def plan_text(name: str, result: PreflightResult, spec: FineTuneJobSpec, *, verdict: str) -> str:
    """The whole report of ``finetune plan``: the verdict, the data, write access, the problems and the
    memory breakdown per rank."""
    lines = [f"FineTuneJob {name}: {verdict}"]
    lines += [f"  {line}" for line in data_lines(result, spec)]
    for uri in result.write_access:
        lines.append(f"  write access: {uri}")
    if result.problems:
        lines.append("  problems:" if result.bad_records else "  problem:")
        lines += [f"    {p}" for p in result.problems]
        if result.bad_records > len(result.problems):
            lines.append(f"    ... and {result.bad_records - len(result.problems):,} more")
    if result.memory is not None:
        lines += [f"  {line}" for line in memory_breakdown(result.memory, spec).splitlines()]
    elif result.memory_note:
        lines.append(f"  memory: {result.memory_note}")
    return "\n".join(lines)


def summary_line(result: PreflightResult, spec: FineTuneJobSpec) -> str:
    """One line for ``finetune run``: what the preflight found before training starts."""
    parts = [f"{_n(result.train_records)} training records"]
    if result.token_length_max is not None:
        parts.append(
            f"tokens p50 {_n(result.token_length_p50)} / p95 {_n(result.token_length_p95)} / "
            f"max {_n(result.token_length_max)} ({(result.truncated_fraction or 0.0):.1%} cut)"
        )
    if result.steps_per_epoch is not None:
        parts.append(f"{_n(result.steps_per_epoch)} steps an epoch")
    if result.memory is not None:
        where = "GPU memory" if spec.resources.gpus_per_node else "memory"
        parts.append(f"~{result.memory.total / 1024**3:.2f} GiB {where} per rank")
    return "preflight: " + ", ".join(parts)
