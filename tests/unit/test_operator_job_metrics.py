"""The operator's per-job gauges (the job-failed and restarting alerts read them)."""

from __future__ import annotations

from finetune_operator import handlers
from prometheus_client import REGISTRY


def phase(job: str, ph: str) -> float | None:
    return REGISTRY.get_sample_value("finetune_operator_job_phase", {"namespace": "m", "job": job, "phase": ph})


def restarts(job: str) -> float | None:
    return REGISTRY.get_sample_value("finetune_operator_job_restarts", {"namespace": "m", "job": job})


def test_phase_and_restarts_follow_reconciles_and_vanish_with_the_job() -> None:
    handlers._record_phase("m", "a", "Running", 0)
    handlers._record_phase("m", "b", "Running", 0)
    assert phase("a", "Running") == 1 and phase("a", "Pending") == 0 and restarts("a") == 0
    handlers._record_phase("m", "a", "Restarting", 2)
    assert phase("a", "Running") == 0 and phase("a", "Restarting") == 1 and restarts("a") == 2
    assert REGISTRY.get_sample_value("finetune_operator_jobs", {"namespace": "m", "phase": "Running"}) == 1
    handlers._record_phase("m", "a", None)
    assert phase("a", "Restarting") is None and restarts("a") is None
    assert phase("b", "Running") == 1, "another job's series went with it"
    handlers._record_phase("m", "a", None)  # deleting twice is harmless
    handlers._record_phase("m", "b", None)
