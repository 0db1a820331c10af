"""The trainer's status reporter (finetune_trainer.status) passes every evaluation score a FineTuneSweep's
objective may name into status.progress, by its CRD name and within the CRD's bounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from finetune_operator.api.sweep import METRIC_KEYS
from finetune_operator.api.v1alpha1 import Progress
from finetune_trainer.status import StatusReporter, progress_body


class RecordingTarget:
    """A KubeTarget that keeps the merge patches instead of sending them."""

    url = "http://api.invalid/apis/finetune.io/v1alpha1/namespaces/ml/finetunejobs/s-0/status"

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def patch(self, body: dict[str, Any], timeout: float = 5.0) -> int:
        self.bodies.append(body)
        return 200


def test_the_generation_and_distill_scores_reach_status_progress() -> None:
    body = progress_body(
        {"step": 40, "total_steps": 100, "eval_loss": 0.845, "eval_perplexity": 14.0}
        | {"eval_bleu": 37.5, "eval_rougeL": 0.42, "eval_rouge1": 0.5, "eval_agreement": 0.64}
    )
    assert body["evalBleu"] == 37.5, "sacreBLEU's 0-100 scale is kept, not clipped to 1"
    assert (body["evalRougeL"], body["evalAgreement"], body["evalPerplexity"]) == (0.42, 0.64, 14.0)
    assert "evalRouge1" not in body, "only the objective's ROUGE (rougeL) is a status.progress field"


def test_the_new_scores_stay_within_the_crd_bounds() -> None:
    body = progress_body(
        {"step": 1, "eval_bleu": 100.00001, "eval_rougeL": 1.0000001, "eval_agreement": -1e-9}
        | {"eval_perplexity": float("inf")}
    )
    assert (body["evalBleu"], body["evalRougeL"], body["evalAgreement"]) == (100.0, 1.0, 0.0)
    assert "evalPerplexity" not in body, "non-finite numbers stay out"
    assert progress_body({"step": 1, "eval_bleu": -0.5})["evalBleu"] == 0.0


def test_every_objective_key_is_a_progress_field_the_crd_keeps(repo: Path) -> None:
    """The harness's sink passes a record's keys that are Progress fields (by Python name), the reporter
    refuses others; the committed CRD must keep each under its camelCase name (the API server prunes
    unknown status fields)."""
    crd = yaml.safe_load((repo / "crds/finetunejobs.finetune.io.yaml").read_text(encoding="utf-8"))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    in_crd = schema["properties"]["status"]["properties"]["progress"]["properties"]
    for metric, key in METRIC_KEYS.items():
        assert key in Progress.model_fields, f"objective {metric}: {key} is no status.progress field"
        alias = Progress.model_fields[key].alias
        assert alias in in_crd, f"objective {metric}: {alias} is not in the CRD's status.progress"
    assert in_crd["evalBleu"]["maximum"] == 100 and in_crd["evalRougeL"]["maximum"] == 1


def test_the_reporter_patches_the_objective_scores() -> None:
    target = RecordingTarget()
    reporter = StatusReporter(target, min_interval=3600.0)  # type: ignore[arg-type]
    record = {"step": 40, "epoch": 0.4, "eval_loss": 0.845, "eval_bleu": 37.5, "eval_rougeL": 0.42}
    reporter.update(**{k: v for k, v in record.items() if k in Progress.model_fields}, total_steps=100)
    reporter.update(step=40, eval_agreement=0.64, eval_perplexity=14.0)
    reporter.close()
    progress = target.bodies[-1]["status"]["progress"]
    assert (progress["evalBleu"], progress["evalRougeL"], progress["evalAgreement"]) == (37.5, 0.42, 0.64)
    assert (progress["evalPerplexity"], progress["evalLoss"], progress["step"]) == (14.0, 0.845, 40)


def test_online_rl_reward_and_kl_reach_status_progress() -> None:
    """A reward on a reward model's scale may be negative: passed as it is, as the KL (an estimate)."""
    body = progress_body({"step": 8, "reward": -6.5, "kl": 0.07, "eval_reward": -5.75, "entropy": 1.2})
    assert (body["reward"], body["kl"], body["evalReward"]) == (-6.5, 0.07, -5.75)
    assert "entropy" not in body
