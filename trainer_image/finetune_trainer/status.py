"""Progress into the FineTuneJob's status, from rank 0, with the pod's ServiceAccount token.

In a cluster the operator sets ``FINETUNE_JOB_NAMESPACE`` and ``FINETUNE_JOB_NAME``, mounts the
ServiceAccount token and grants a Role with ``get`` and ``patch`` on ``finetunejobs/status`` for this
job only (``resourceNames``). The reporter then sends a JSON merge patch of ``status.progress`` and
``status.checkpoints`` to ``/apis/finetune.io/v1alpha1/namespaces/NS/finetunejobs/NAME/status`` at most
every ``MIN_INTERVAL`` seconds, from a background thread: training never waits for the API server,
and an unreachable or refusing server is logged (once per kind of error) and tried again later.

Overridable for tests and local runs: ``FINETUNE_KUBE_API`` (default
``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``), ``FINETUNE_KUBE_TOKEN_FILE`` and
``FINETUNE_KUBE_CA_FILE`` (default: the mounted ServiceAccount's ``token`` and ``ca.crt``). The token
file is re-read for every request (kubelet rotates it). The patch is built from the API's typed
status models (:class:`~finetune_operator.api.v1alpha1.Progress`, ``CheckpointRecord``), so it has
the CRD's field names and bounds by construction; the HTTP client is the standard library's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_operator.api.v1alpha1 import (
    PROVENANCE_OPERATOR_FIELDS,
    Artifact,
    CheckpointRecord,
    Progress,
    Provenance,
    RollbackRecord,
)

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_INTERVAL = 10.0
REQUEST_TIMEOUT = 5.0
SUMMARY_MAX = 64


class KubeTarget:
    """Where and how to patch: API URL, the job, the token file and CA bundle."""

    def __init__(self, api: str, namespace: str, name: str, token_file: Path, ca_file: Path | None):
        self.api = api.rstrip("/")
        self.namespace = namespace
        self.name = name
        self.token_file = token_file
        self.ca_file = ca_file

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KubeTarget | None:
        """The target when running for a FineTuneJob in a cluster, else None (reporting is off)."""
        env = dict(os.environ if env is None else env)
        namespace, name = env.get("FINETUNE_JOB_NAMESPACE"), env.get("FINETUNE_JOB_NAME")
        if not namespace or not name:
            return None
        api = env.get("FINETUNE_KUBE_API")
        if not api:
            host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                log.warning("status: FINETUNE_JOB_NAME is set but no API server is known; not reporting")
                return None
            api = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        token_file = Path(env.get("FINETUNE_KUBE_TOKEN_FILE") or SA_DIR / "token")
        if not token_file.is_file():
            log.warning("status: no ServiceAccount token at %s; not reporting", token_file)
            return None
        ca = env.get("FINETUNE_KUBE_CA_FILE")
        ca_file = Path(ca) if ca else (SA_DIR / "ca.crt" if (SA_DIR / "ca.crt").is_file() else None)
        return cls(api, namespace, name, token_file, ca_file)

    @property
    def url(self) -> str:
        ns, name = urllib.parse.quote(self.namespace), urllib.parse.quote(self.name)
        return f"{self.api}/apis/finetune.io/v1alpha1/namespaces/{ns}/finetunejobs/{name}/status"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    def patch(self, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> int:
        """Send one merge patch; return the HTTP status (raises OSError on connection errors)."""
        token = self.token_file.read_text(encoding="utf-8").strip()
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
        )
        context = self.ssl_context() if self.url.startswith("https://") else None
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                status: int = response.status
                return status
        except urllib.error.HTTPError as exc:
            return exc.code


#: Progress fields that are never negative in the CRD (losses may be anything finite).
_NON_NEGATIVE = (
    "epoch",
    "eval_perplexity",
    "general_perplexity",
    "general_perplexity_before",
    "learning_rate",
    "tokens_per_second",
    "eta_seconds",
    "seconds_per_step",
)
#: Scores between 0 and 1 (status.progress bounds them; a recipe's rounding must not break the patch).
_FRACTIONS = ("eval_accuracy", "eval_f1", "eval_exact_match", "eval_agreement", "eval_rougeL")
#: Scores between 0 and 100 (sacreBLEU's scale).
_PERCENTAGES = ("eval_bleu",)
#: The numbers copied from the trainer's record (the rest of status.progress is derived here). The
#: evaluation scores are all those a FineTuneSweep's objective may name (api.sweep.METRIC_KEYS): the
#: operator reads a trial's objective from here.
_REPORTED = (
    "epoch",
    "loss",
    "eval_loss",
    "eval_perplexity",
    *_FRACTIONS,
    *_PERCENTAGES,
    "eval_reward",
    "reward",
    "kl",
    "general_perplexity",
    "general_perplexity_before",
    "learning_rate",
    "tokens_per_second",
    "eta_seconds",
    "seconds_per_step",
)


def progress_body(latest: dict[str, Any]) -> dict[str, Any]:
    """status.progress from the trainer's latest numbers (keys: :class:`Progress`'s field names);
    non-finite numbers are left out, the percentage and summary derived."""
    step = int(latest.get("step") or 0)
    fields: dict[str, Any] = {"step": step}
    for key in _REPORTED:
        value = latest.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            number = float(value)
            if key in _NON_NEGATIVE:
                number = max(number, 0.0)
            elif key in _FRACTIONS:
                number = min(max(number, 0.0), 1.0)
            elif key in _PERCENTAGES:
                number = min(max(number, 0.0), 100.0)
            fields[key] = number
    total = latest.get("total_steps")
    if total:
        percent = min(100.0, 100.0 * step / total)
        fields.update(total_steps=int(total), percent=round(percent, 2), summary=f"{step}/{total} ({percent:.0f}%)")
    if latest.get("last_checkpoint_step") is not None:
        fields["last_checkpoint_step"] = int(latest["last_checkpoint_step"])
    fields["summary"] = str(fields.get("summary", f"{step} steps"))[:SUMMARY_MAX]
    fields["updated_at"] = datetime.now(UTC).replace(microsecond=0)
    return Progress(**fields).model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusReporter:
    """A background thread that patches the FineTuneJob's status with the latest progress."""

    def __init__(self, target: KubeTarget, *, min_interval: float = MIN_INTERVAL):
        self.target = target
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress: dict[str, Any] = {}
        self._checkpoints: list[CheckpointRecord] | None = None
        self._rollbacks: list[dict[str, Any]] | None = None
        self._outputs: dict[str, Any] | None = None
        self._dirty = False
        self._last_sent = -float("inf")
        self._last_error: str | None = None
        self.sent = 0
        self.failures = 0
        self.last_status: int | None = None
        self._thread = threading.Thread(target=self._loop, name="status-reporter", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, **kwargs: Any) -> StatusReporter | None:
        target = KubeTarget.from_env()
        return cls(target, **kwargs) if target else None

    def update(self, **progress: Any) -> None:
        """Merge the newest numbers (keys: :class:`Progress`'s field names, e.g. ``total_steps``);
        sent within ``min_interval``."""
        unknown = set(progress) - set(Progress.model_fields)
        if unknown:
            raise TypeError(f"not fields of status.progress: {sorted(unknown)}")
        with self._lock:
            self._progress.update({k: v for k, v in progress.items() if v is not None})
            self._dirty = True
        self._wake.set()

    def set_checkpoints(self, checkpoints: list[CheckpointRecord]) -> None:
        """The committed checkpoints kept (status.checkpoints, oldest first)."""
        with self._lock:
            self._checkpoints = list(checkpoints)[-1000:]
            if checkpoints:
                self._progress["last_checkpoint_step"] = checkpoints[-1].step
            self._dirty = True
        self._wake.set()

    def set_rollbacks(self, records: list[dict[str, Any]]) -> None:
        """The divergences rolled back (status.rollbacks), as the checkpoint store records them."""
        rows = [
            RollbackRecord(
                step=r["step"],
                detected_step=r["detected_step"],
                loss=r.get("loss"),
                lowest_loss=r.get("lowest_loss"),
                removed_checkpoints=r.get("removed_checkpoints") or [],
                resumed_from=r["resumed_from"] if (r.get("resumed_from") or 0) >= 0 else None,
                learning_rate_scale=r["learning_rate_scale"],
                time=r["time"],
            ).model_dump(by_alias=True, mode="json")
            for r in records[-100:]
        ]
        with self._lock:
            self._rollbacks = rows
            self._dirty = True
        self._wake.set()

    def set_outputs(self, artifacts: list[Artifact], provenance: Provenance) -> None:
        """What the job wrote (status.artifacts) and what produced it (the trainer's fields of
        status.provenance: those the operator sets are left out of the patch, so neither overwrites
        the other's)."""
        trainer_part = provenance.model_dump(
            by_alias=True, mode="json", exclude_none=True, exclude=set(PROVENANCE_OPERATOR_FIELDS)
        )
        with self._lock:
            self._outputs = {
                "artifacts": [a.model_dump(by_alias=True, mode="json") for a in artifacts],
                "provenance": trainer_part,
            }
            self._dirty = True
        self._wake.set()

    def _body(self) -> dict[str, Any]:
        with self._lock:
            status: dict[str, Any] = {"progress": progress_body(self._progress)}
            if self._checkpoints is not None:
                status["checkpoints"] = [c.model_dump(by_alias=True, mode="json") for c in self._checkpoints]
            if self._rollbacks is not None:
                status["rollbacks"] = self._rollbacks
            if self._outputs is not None:
                status.update(self._outputs)
            self._dirty = False
        return {"status": status}

    def _send(self) -> bool:
        body = self._body()
        code: int | None
        error: str | None
        try:
            code = self.target.patch(body)
        except (OSError, ValueError) as exc:
            code, error = None, f"{type(exc).__name__}: {exc}"
        else:
            error = None if 200 <= code < 300 else f"HTTP {code}"
            if code == 403:
                error = f"{error} (forbidden: the trainer's Role must allow patch on finetunejobs/status for this job)"
        self.last_status = code
        if error is None:
            self.sent += 1
            self._last_error = None
            return True
        self.failures += 1
        with self._lock:
            self._dirty = True  # try again at the next interval
        if error != self._last_error:
            log.warning(
                "status: patching %s failed: %s; retrying every %.0fs", self.target.url, error, self.min_interval
            )
            self._last_error = error
        return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = self._last_sent + self.min_interval - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            with self._lock:
                dirty = self._dirty
            if not dirty:
                self._wake.wait(self.min_interval)
                self._wake.clear()
                continue
            self._last_sent = time.monotonic()
            self._send()

    def close(self, timeout: float = REQUEST_TIMEOUT) -> None:
        """Stop the thread and send what is pending, once, within ``timeout`` seconds."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            dirty = self._dirty
        if dirty:
            body = self._body()
            try:
                self.last_status = self.target.patch(body, timeout=timeout)
                if self.last_status < 300:
                    self.sent += 1
            except (OSError, ValueError) as exc:
                log.warning("status: final patch failed: %s", exc)
