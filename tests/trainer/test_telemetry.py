"""Metric details a scrape cannot show: MFU's inputs, CPU memory, the status body's bounds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from finetune_trainer import telemetry
from finetune_trainer.status import progress_body


def test_mfu_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINETUNE_PEAK_FLOPS", raising=False)
    assert telemetry.peak_flops() is None, "no accelerator, no peak: MFU stays absent on CPU"
    monkeypatch.setenv("FINETUNE_PEAK_FLOPS", "2.5e14")
    assert telemetry.peak_flops() == 2.5e14
    dense = torch.nn.Linear(10, 10)  # 110 parameters
    dense.config = SimpleNamespace(num_experts=None)  # type: ignore[assignment]
    assert telemetry.flops_per_token(dense) == 6 * 110
    moe = torch.nn.Linear(10, 10)
    moe.config = SimpleNamespace(num_local_experts=8)  # type: ignore[assignment]
    assert telemetry.flops_per_token(moe) is None, "mixture of experts: FLOPs per token unknown"


def test_cpu_memory_is_the_process_rss() -> None:
    allocated, peak = telemetry.memory_bytes()
    assert 10 * 2**20 < allocated <= peak


def test_metrics_port_follows_the_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINETUNE_METRICS_PORT", raising=False)
    assert telemetry.metrics_port(9410, 3) == 9413
    monkeypatch.setenv("FINETUNE_METRICS_PORT", "20000")
    assert telemetry.metrics_port(9410, 1) == 20001


def test_status_progress_stays_within_the_crd_bounds() -> None:
    body = progress_body(
        {"step": 7, "total_steps": 10, "loss": float("nan"), "eval_loss": -0.5, "eta_seconds": -1.0, "epoch": 0.7}
        | {"eval_f1": 1.0000001, "eval_accuracy": 0.75, "eval_exact_match": float("inf"), "eval_f1_spam": 0.5}
        | {"general_perplexity": 12.5, "general_perplexity_before": 3.25}
    )
    assert (body["step"], body["totalSteps"], body["percent"], body["summary"]) == (7, 10, 70.0, "7/10 (70%)")
    assert "loss" not in body and body["evalLoss"] == -0.5 and body["etaSeconds"] == 0.0
    assert (body["evalF1"], body["evalAccuracy"]) == (1.0, 0.75), "scores stay within 0..1"
    assert "evalExactMatch" not in body and "evalF1Spam" not in body, "non-finite and per-class values stay out"
    assert (body["generalPerplexity"], body["generalPerplexityBefore"]) == (12.5, 3.25), "forgetting.generalEval's"
    assert body["updatedAt"].endswith("Z")


def test_task_metrics_of_an_evaluation_reach_their_gauges() -> None:
    from finetune_trainer.throughput import Throughput

    metrics = telemetry.TrainingMetrics(namespace="ns", job="j", rank=0)
    callback = telemetry.TelemetryCallback(metrics, Throughput(SimpleNamespace(tokens=0, samples=0)))
    callback.on_evaluate(None, None, None, metrics={"eval_loss": 0.5, "eval_f1": 0.25, "eval_accuracy": 0.75})
    labels = {"namespace": "ns", "job": "j", "rank": "0"}

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert (value("finetune_eval_loss"), value("finetune_eval_f1"), value("finetune_eval_accuracy")) == (
        0.5,
        0.25,
        0.75,
    )
    assert value("finetune_eval_exact_match") is None, "a metric the task does not report has no series"


def test_online_rl_logs_reach_their_gauges_and_other_logs_make_no_rl_series() -> None:
    from finetune_trainer.throughput import Throughput

    metrics = telemetry.TrainingMetrics(namespace="ns", job="j", rank=0)
    callback = telemetry.TelemetryCallback(metrics, Throughput(SimpleNamespace(tokens=0, samples=0)))
    labels = {"namespace": "ns", "job": "j", "rank": "0"}
    callback.on_log(None, SimpleNamespace(global_step=1), None, logs={"loss": 0.5, "learning_rate": 1e-4})
    for name, _ in telemetry.RL_LOGGED.values():
        assert metrics.registry.get_sample_value(name, labels) is None, name
    logs = {key: float(i) - 2.5 for i, key in enumerate(telemetry.RL_LOGGED)}
    callback.on_log(None, SimpleNamespace(global_step=2), None, logs={"loss": 0.5, **logs})
    for key, (name, _) in telemetry.RL_LOGGED.items():
        assert metrics.registry.get_sample_value(name, labels) == logs[key], name
    callback.on_evaluate(None, None, None, metrics={"eval_reward": -4.0, "eval_loss": 1.0})
    assert metrics.registry.get_sample_value("finetune_eval_reward", labels) == -4.0
