"""Progress reporting from rank 0: a progress line (bar, step/total, loss, tokens/s, ETA) and a log.

Tokens/s is the job's mean since the run (re)started, as :mod:`.throughput` defines it.

Every log event is appended to ``metrics.jsonl`` in the work directory (``finetune report`` reads it);
the terminal shows one line per event, redrawn in place on a TTY; ``sink`` (the FineTuneJob status
reporter in a cluster) receives every record too.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

from .distributed import World
from .throughput import Throughput


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def bar(fraction: float, width: int = 20) -> str:
    filled = min(width, round(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class ProgressReporter(TrainerCallback):
    def __init__(
        self,
        world: World,
        throughput: Throughput,
        metrics_path: Path,
        stream: TextIO | None = None,
        sink: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.world = world
        self.sink = sink
        self.last_checkpoint_step: int | None = None
        self.throughput = throughput
        self.metrics_path = metrics_path
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.start_step = 0
        self.total_steps = 0
        self.latest: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.monotonic()
        self.start_step = state.global_step
        self.total_steps = state.max_steps

    def snapshot(self, step: int) -> dict[str, Any]:
        elapsed = time.monotonic() - self.start
        done = step - self.start_step
        mean = self.throughput.mean()
        tps = mean[0] * self.world.world_size if mean else 0.0  # the job's, from this rank's
        eta = elapsed / done * (self.total_steps - step) if done > 0 else None
        per_step = elapsed / done if done > 0 else None
        return {"tokens_per_second": tps, "eta_seconds": eta, "elapsed_seconds": elapsed, "seconds_per_step": per_step}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not self.world.is_main or not logs:
            return
        record = {"time": time.time(), "step": state.global_step, "epoch": state.epoch, **logs}
        if "loss" in logs:
            record.update(self.snapshot(state.global_step))
        record["total_steps"] = self.total_steps
        if self.last_checkpoint_step is not None:
            record["last_checkpoint_step"] = self.last_checkpoint_step
        self.latest.update({k: v for k, v in record.items() if v is not None})
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        self.stream.write(self.line(record) + "\n")
        self.stream.flush()
        if self.sink is not None:
            self.sink(record)

    def line(self, record: dict[str, Any]) -> str:
        step, total = record["step"], self.total_steps
        parts = [f"{bar(step / total)} {step}/{total}" if total else "before training"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "learning_rate" in record:
            parts.append(f"lr {record['learning_rate']:.2e}")
        for key in sorted(k for k in record if k.endswith(("_loss", "_perplexity", "_agreement")) and k != "loss"):
            value = record[key]
            if isinstance(value, float) and math.isfinite(value):
                parts.append(f"{key} {value:.4f}")
        if record.get("tokens_per_second"):
            parts.append(f"{record['tokens_per_second']:,.0f} tok/s")
        if record.get("eta_seconds") is not None:
            parts.append(f"eta {format_duration(record['eta_seconds'])}")
        if record.get("last_checkpoint_step") is not None:
            parts.append(f"ckpt {record['last_checkpoint_step']}")
        return " | ".join(parts)
