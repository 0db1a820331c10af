"""Prometheus metrics, served by every rank: ``/metrics`` on port ``spec.metrics.port + local rank``.

``FINETUNE_METRICS_PORT`` overrides the base port (the operator sets it; local runs and tests use it),
``FINETUNE_METRICS_ADDRESS`` the listen address (default all interfaces). Every series carries the
labels ``namespace``, ``job`` (the FineTuneJob) and ``rank`` (global rank). Scrape with
``honor_labels: true``, or Prometheus renames our ``job`` label to ``exported_job``.

===============================================  =========  ===============================================
metric                                           type       meaning
===============================================  =========  ===============================================
finetune_train_loss                              gauge      latest logged training loss (mean over ranks)
finetune_eval_loss                               gauge      latest evaluation loss
finetune_eval_accuracy                           gauge      latest evaluation accuracy, 0..1 (tasks that
                                                            report it: classification, reward, dpo)
finetune_eval_f1                                 gauge      latest evaluation F1, 0..1 (classification:
                                                            macro F1; qa: SQuAD token F1)
finetune_eval_exact_match                        gauge      latest evaluation exact match, 0..1 (qa)
finetune_eval_reward                             gauge      latest evaluation mean reward of sampled
                                                            completions (rl: ppo)
finetune_rl_reward                               gauge      mean score of the latest logged rollouts'
                                                            completions (rl; reward model + verifiable)
finetune_rl_reward_std                           gauge      its standard deviation over the completions
finetune_rl_kl                                   gauge      mean per-token KL of the policy to the
                                                            reference (rl, klCoef > 0)
finetune_rl_entropy                              gauge      mean per-token entropy of the sampling (rl)
finetune_rl_completion_length_mean               gauge      mean completion length in tokens (rl)
finetune_rl_generation_tokens_per_second         gauge      generated tokens/s of the latest rollouts (rl)
finetune_ppo_clip_fraction                       gauge      fraction of tokens whose ratio was clipped (ppo)
finetune_ppo_value_loss                          gauge      the value head's clipped loss (ppo)
finetune_ppo_approx_kl                           gauge      approximate KL to the rollout policy (ppo)
finetune_learning_rate                           gauge      current learning rate
finetune_global_step                             gauge      optimizer steps done (goes back on resume)
finetune_total_steps                             gauge      optimizer steps planned
finetune_epoch                                   gauge      fractional epoch
finetune_tokens_per_second                       gauge      this rank's training tokens/s (last 20 steps);
                                                            sum over ranks for the job's throughput
finetune_samples_per_second                      gauge      this rank's training samples/s (last 20 steps)
finetune_step_duration_seconds                   histogram  wall time of one optimizer step on this rank
finetune_accelerator_memory_allocated_bytes      gauge      CUDA memory allocated by torch; on CPU the
                                                            process's resident set size (RSS)
finetune_accelerator_memory_peak_bytes           gauge      CUDA peak allocated; on CPU the peak RSS
finetune_checkpoint_save_duration_seconds        histogram  writing a checkpoint to local disk
finetune_checkpoint_upload_duration_seconds      histogram  uploading it (uploading ranks: local rank 0)
finetune_checkpoint_size_bytes                   gauge      bytes this node uploaded for the last checkpoint
finetune_checkpoint_uploaded_bytes_total         counter    bytes uploaded by this node
finetune_checkpoint_upload_failures_total        counter    uploads that failed (training went on)
finetune_last_checkpoint_step                    gauge      step of the newest committed checkpoint (rank 0,
                                                            and every rank after a resume)
finetune_last_checkpoint_timestamp_seconds       gauge      when it was committed (Unix time)
finetune_preemptions_total                       counter    SIGTERMs received by this process
finetune_model_flops_utilization_ratio           gauge      MFU: tokens/s x 6 x parameters / peak FLOP/s;
                                                            only for dense models on an accelerator whose
                                                            peak is known (table below, or
                                                            FINETUNE_PEAK_FLOPS), absent otherwise
===============================================  =========  ===============================================
"""

from __future__ import annotations

import logging
import math
import os
import resource
import threading
import time
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from transformers import TrainerCallback

from .throughput import Throughput

log = logging.getLogger(__name__)

LABELS = ("namespace", "job", "rank")
#: Online RL's logged numbers (recipes.rl's trl trainers, recipes.ppo): the key in the logs -> the
#: gauge and its help. A series appears with the first log that has the key (none for other tasks).
RL_LOGGED: dict[str, tuple[str, str]] = {
    "reward": ("finetune_rl_reward", "Mean score of the latest logged rollouts' completions."),
    "reward_std": ("finetune_rl_reward_std", "Standard deviation of those scores."),
    "kl": ("finetune_rl_kl", "Mean per-token KL of the policy to the reference."),
    "entropy": ("finetune_rl_entropy", "Mean per-token entropy of the sampling distribution."),
    "completions/mean_length": ("finetune_rl_completion_length_mean", "Mean completion length in tokens."),
    "generation_tokens_per_second": (
        "finetune_rl_generation_tokens_per_second",
        "Generated tokens per second of the latest rollouts (every rank's).",
    ),
    "clip_fraction": ("finetune_ppo_clip_fraction", "PPO: fraction of completion tokens whose ratio was clipped."),
    "value_loss": ("finetune_ppo_value_loss", "PPO: the value head's clipped loss."),
    "approx_kl": ("finetune_ppo_approx_kl", "PPO: approximate KL of the policy to the rollout policy."),
}
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

#: Peak dense (no sparsity) bf16/fp16 tensor FLOP/s per device, from the vendors' datasheets. Matched
#: in order against torch.cuda.get_device_name(): more specific names first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("T4", 65e12),
)
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def peak_flops() -> float | None:
    """Peak FLOP/s of this process's accelerator: FINETUNE_PEAK_FLOPS, else the table; None on CPU."""
    override = os.environ.get("FINETUNE_PEAK_FLOPS")
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for needle, flops in PEAK_FLOPS:
        if needle in name:
            return flops
    return None


def flops_per_token(model: Any) -> float | None:
    """6 x parameters (forward + backward) for dense causal LMs; None for mixture-of-experts models."""
    config = getattr(model, "config", None)
    if config is not None and any(getattr(config, key, None) for key in MOE_CONFIG_KEYS):
        return None
    params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    return 6.0 * params if params else None


def memory_bytes() -> tuple[int, int]:
    """(allocated, peak): CUDA memory of this process's device, or the process's RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return rss, max(peak, rss)


def metrics_port(spec_port: int, local_rank: int) -> int:
    return int(os.environ.get("FINETUNE_METRICS_PORT") or spec_port) + local_rank


class TrainingMetrics:
    """The trainer's Prometheus metrics for one rank (own registry: nothing global is touched)."""

    def __init__(self, *, namespace: str, job: str, rank: int):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"namespace": namespace, "job": job, "rank": str(rank)}
        self._lock = threading.Lock()
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=r)

        self.train_loss = gauge("finetune_train_loss", "Latest logged training loss (mean over ranks).")
        self.eval_loss = gauge("finetune_eval_loss", "Latest evaluation loss.")
        #: The gauge of each evaluation metric a recipe reports, by its key in the evaluation's metrics.
        #: A series appears with the first evaluation that reports it (none for tasks without it).
        self.eval_metrics: dict[str, Gauge] = {
            "eval_loss": self.eval_loss,
            "eval_accuracy": gauge("finetune_eval_accuracy", "Latest evaluation accuracy (0..1)."),
            "eval_f1": gauge("finetune_eval_f1", "Latest evaluation F1 (0..1; classification: macro F1)."),
            "eval_exact_match": gauge("finetune_eval_exact_match", "Latest evaluation exact match (0..1)."),
            "eval_reward": gauge("finetune_eval_reward", "Latest evaluation mean reward of sampled completions."),
            "general_perplexity": gauge(
                "finetune_general_perplexity", "Latest perplexity on general text (forgetting.generalEval)."
            ),
        }
        self.rl_logged: dict[str, Gauge] = {key: gauge(name, doc) for key, (name, doc) in RL_LOGGED.items()}
        self.learning_rate = gauge("finetune_learning_rate", "Current learning rate.")
        self.ewc_penalty = gauge(
            "finetune_ewc_penalty", "Latest logged EWC penalty added to the loss (forgetting.ewc)."
        )
        self.global_step = gauge("finetune_global_step", "Optimizer steps done.")
        self.total_steps = gauge("finetune_total_steps", "Optimizer steps planned.")
        self.epoch = gauge("finetune_epoch", "Fractional epoch.")
        self.tokens_per_second = gauge("finetune_tokens_per_second", "Training tokens per second on this rank.")
        self.samples_per_second = gauge("finetune_samples_per_second", "Training samples per second on this rank.")
        self.step_duration = Histogram(
            "finetune_step_duration_seconds", "Wall time of one optimizer step.", LABELS, registry=r,
            buckets=STEP_BUCKETS,
        )  # fmt: skip
        self.memory_allocated = gauge(
            "finetune_accelerator_memory_allocated_bytes", "Accelerator memory allocated (CPU: process RSS)."
        )
        self.memory_peak = gauge(
            "finetune_accelerator_memory_peak_bytes", "Peak accelerator memory allocated (CPU: peak RSS)."
        )
        self.checkpoint_save = Histogram(
            "finetune_checkpoint_save_duration_seconds", "Writing a checkpoint to local disk.", LABELS,
            registry=r, buckets=CHECKPOINT_BUCKETS,
        )  # fmt: skip
        self.checkpoint_upload = Histogram(
            "finetune_checkpoint_upload_duration_seconds", "Uploading a checkpoint to its store.", LABELS,
            registry=r, buckets=CHECKPOINT_BUCKETS,
        )  # fmt: skip
        self.checkpoint_size = gauge("finetune_checkpoint_size_bytes", "Bytes this node uploaded, last checkpoint.")
        self.uploaded_bytes = Counter(
            "finetune_checkpoint_uploaded_bytes", "Checkpoint bytes uploaded by this node.", LABELS, registry=r
        )
        self.upload_failures = Counter(
            "finetune_checkpoint_upload_failures", "Checkpoint uploads that failed.", LABELS, registry=r
        )
        self.last_checkpoint_step = gauge("finetune_last_checkpoint_step", "Step of the newest committed checkpoint.")
        self.last_checkpoint_time = gauge(
            "finetune_last_checkpoint_timestamp_seconds", "When the newest checkpoint was committed (Unix time)."
        )
        self.preemptions = Counter("finetune_preemptions", "SIGTERMs received by this process.", LABELS, registry=r)
        self._mfu: Gauge | None = None
        # Series that exist from the start (zero), so dashboards and alerts see them before any event.
        for metric in (self.preemptions, self.uploaded_bytes, self.upload_failures):
            metric.labels(**self.labels)
        self.step_duration.labels(**self.labels)

    def set(self, gauge: Gauge, value: float | None) -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            gauge.labels(**self.labels).set(value)

    def set_mfu(self, value: float) -> None:
        with self._lock:
            if self._mfu is None:
                self._mfu = Gauge(
                    "finetune_model_flops_utilization_ratio",
                    "Model FLOPs utilization: achieved / peak FLOP/s (6 x parameters per token).",
                    LABELS,
                    registry=self.registry,
                )
        self._mfu.labels(**self.labels).set(value)

    def observe_save(self, seconds: float) -> None:
        self.checkpoint_save.labels(**self.labels).observe(seconds)

    def observe_upload(self, seconds: float, nbytes: int) -> None:
        self.checkpoint_upload.labels(**self.labels).observe(seconds)
        self.checkpoint_size.labels(**self.labels).set(nbytes)
        self.uploaded_bytes.labels(**self.labels).inc(nbytes)

    def upload_failed(self) -> None:
        self.upload_failures.labels(**self.labels).inc()

    def committed(self, step: int, timestamp: float) -> None:
        self.set(self.last_checkpoint_step, step)
        self.set(self.last_checkpoint_time, timestamp)

    def preempted(self) -> None:
        self.preemptions.labels(**self.labels).inc()

    def serve(self, port: int, address: str | None = None) -> bool:
        address = address or os.environ.get("FINETUNE_METRICS_ADDRESS") or "0.0.0.0"
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:  # a taken port must not stop the training
            log.warning("metrics: cannot listen on %s:%d (%s); metrics are not served", address, port, exc)
            return False
        log.info("metrics: serving on %s:%d/metrics", address, port)
        return True


class TelemetryCallback(TrainerCallback):
    """Feeds :class:`TrainingMetrics` from the Trainer's events, on every rank (throughput from the
    run's :class:`~.throughput.Throughput`, the recent per-rank rate)."""

    def __init__(self, metrics: TrainingMetrics, throughput: Throughput):
        self.metrics = metrics
        self.throughput = throughput
        self.flops_per_token: float | None = None
        self.peak_flops: float | None = None
        self._step_started: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        m = self.metrics
        m.set(m.total_steps, state.max_steps)
        m.set(m.global_step, state.global_step)
        self.peak_flops = peak_flops()
        if self.peak_flops and model is not None:
            self.flops_per_token = flops_per_token(model)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        m = self.metrics
        if self._step_started is not None:
            m.step_duration.labels(**m.labels).observe(now - self._step_started)
        rates = self.throughput.current()
        if rates is not None:
            m.set(m.tokens_per_second, rates[0])
            m.set(m.samples_per_second, rates[1])
            if self.flops_per_token and self.peak_flops:
                m.set_mfu(rates[0] * self.flops_per_token / self.peak_flops)
        m.set(m.global_step, state.global_step)
        m.set(m.total_steps, state.max_steps)
        m.set(m.epoch, state.epoch)
        allocated, peak = memory_bytes()
        m.set(m.memory_allocated, allocated)
        m.set(m.memory_peak, peak)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        m = self.metrics
        if "loss" in logs:
            m.set(m.train_loss, float(logs["loss"]))
        if "learning_rate" in logs:
            m.set(m.learning_rate, float(logs["learning_rate"]))
        if "ewc_penalty" in logs:
            m.set(m.ewc_penalty, float(logs["ewc_penalty"]))
        for key, gauge in m.rl_logged.items():
            if isinstance(logs.get(key), int | float):
                m.set(gauge, float(logs[key]))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **_: Any) -> None:
        for key, gauge in self.metrics.eval_metrics.items():
            if metrics and isinstance(metrics.get(key), int | float):
                self.metrics.set(gauge, float(metrics[key]))
