"""Prometheus metrics of the operator (served on --metrics-port, default 8080, path /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_BY_PHASE = Gauge("finetune_operator_jobs", "FineTuneJobs by phase, as last reconciled.", ["namespace", "phase"])
# Per FineTuneJob (label `job` is the FineTuneJob's name, as on the trainer's metrics: scrape with
# honor_labels). One series per phase, 1 for the current one and 0 for the others (alerts: `== 1`).
JOB_PHASE = Gauge(
    "finetune_operator_job_phase",
    "1 for a FineTuneJob's current phase, 0 for the others.",
    ["namespace", "job", "phase"],
)
JOB_RESTARTS = Gauge("finetune_operator_job_restarts", "Gang restarts of a FineTuneJob so far.", ["namespace", "job"])
JOBS_CREATED = Counter("finetune_operator_jobs_created_total", "Training gangs (Jobs) created.")
JOBS_SUCCEEDED = Counter("finetune_operator_jobs_succeeded_total", "FineTuneJobs that succeeded.")
JOBS_FAILED = Counter("finetune_operator_jobs_failed_total", "FineTuneJobs that failed.", ["reason"])
JOBS_RESTARTED = Counter("finetune_operator_jobs_restarted_total", "Gang restarts after a retriable failure.")
CHILDREN_CREATED = Counter("finetune_operator_children_created_total", "Child objects created.", ["kind"])
RECONCILE_SECONDS = Histogram(
    "finetune_operator_reconcile_duration_seconds",
    "Time to reconcile one FineTuneJob.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
API_REQUESTS = Counter(
    "finetune_operator_api_requests_total",
    "Kubernetes API requests made by the reconciler (kopf's watches and bookkeeping not included).",
    ["verb", "resource"],
)
API_ERRORS = Counter(
    "finetune_operator_api_errors_total", "Kubernetes API errors (other than 404/409).", ["verb", "resource", "code"]
)
# Per FineTuneSweep (sweep_handlers.py): its trials by state, and the best complete trial's objective.
SWEEP_TRIALS = Gauge(
    "finetune_operator_sweep_trials",
    "Trials of a FineTuneSweep by state (Running, Complete, Pruned, Failed), as last reconciled.",
    ["namespace", "sweep", "state"],
)
SWEEP_BEST_VALUE = Gauge(
    "finetune_operator_sweep_best_value",
    "The objective of a FineTuneSweep's best complete trial so far.",
    ["namespace", "sweep"],
)
