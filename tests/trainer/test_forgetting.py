"""The controls against forgetting (spec.training.forgetting.ewc and .replay) train as documented.

- EWC's Fisher information is the mean of the squared per-sample gradients of the LM loss (computed
  here directly, with ``backward`` one sample at a time);
- a run with EWC moves its parameters less (the Fisher-weighted distance to θ₀) and keeps general text's
  perplexity lower than the same run without, same steps and seed;
- replay's epochs hold the ratio of replay rows, as a function of the seed and the epoch only;
- under torchrun with 2 ranks, EWC and replay together: the Fisher is the one-process Fisher, and a run
  stopped mid-way and rerun resumes with the stored anchor (not estimated again, the very file) and
  logs the uninterrupted run's losses.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from finetune_operator.api.trainer_config import JobIdentity, TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer import ewc
from finetune_trainer.data import pipeline
from finetune_trainer.data.collate import CausalLMCollator
from finetune_trainer.data.replay import ReplaySampler, replay_rows_per_epoch
from finetune_trainer.distributed import World
from finetune_trainer.faults import NONFINITE_LOSS_AT_STEP
from runs import RunResult
from safetensors.torch import load_file
from tiny import (
    build_tokenizer,
    job_manifest,
    llama_config,
    prompt_completion_rows,
    read_metrics,
    text_rows,
    write_jsonl,
)

STEPS = 24
STRENGTH = 30000.0


# -- the Fisher estimate ------------------------------------------------------------------------------


def test_fisher_estimate_equals_the_mean_of_squared_per_sample_gradients() -> None:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(tokenizer))
    model.lm_head.weight.requires_grad_(False)  # a frozen parameter is not anchored
    texts = [r["text"] for r in text_rows(12, seed=5)]
    rows = []
    for text in texts:
        ids = [*tokenizer(text)["input_ids"][:24], tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": list(ids)})
    rows.append({"input_ids": rows[0]["input_ids"], "labels": [-100] * len(rows[0]["input_ids"])})  # no target
    collator = CausalLMCollator(tokenizer.pad_token_id)
    chosen = ewc.sample_indices(12, 9, seed=3)
    assert chosen == sorted(set(chosen)) and len(chosen) == 9 and chosen != list(range(9))
    indices = [*chosen, 12]
    assert ewc.sample_indices(5, 9, seed=3) == [0, 1, 2, 3, 4]

    fisher, n = ewc.estimate_fisher(model, rows, collator, indices, world=World(0, 0, 1, 1), device=torch.device("cpu"))
    assert n == 9  # the row without a target is skipped
    names = [name for name, _ in ewc.trainable(model)]
    assert "lm_head.weight" not in names and len(fisher) == len(names)

    # Directly: backward one sample at a time, square the gradients, average.
    params = dict(model.named_parameters())
    direct = {name: torch.zeros_like(params[name]) for name in names}
    model.eval()
    for index in indices[:-1]:
        model.zero_grad()
        ids = torch.tensor([rows[index]["input_ids"]])
        model(input_ids=ids, labels=ids).loss.backward()
        for name in names:
            direct[name] += params[name].grad.square()  # type: ignore[union-attr]
    for name, estimate in zip(names, fisher, strict=True):
        torch.testing.assert_close(estimate, direct[name] / 9, rtol=1e-4, atol=1e-10)
    assert sum(float(f.sum()) for f in fisher) > 0


# -- replay: what an epoch holds -----------------------------------------------------------------------


@pytest.mark.parametrize(("train_rows", "replay_rows", "ratio"), [(400, 37, 0.1), (90, 500, 0.25), (7, 3, 0.5)])
def test_replay_epochs_hold_the_ratio_as_a_function_of_seed_and_epoch(
    train_rows: int, replay_rows: int, ratio: float
) -> None:
    sampler = ReplaySampler(train_rows, replay_rows, ratio, seed=11)
    per_epoch = replay_rows_per_epoch(train_rows, ratio)
    assert len(sampler) == train_rows + per_epoch
    seen: list[int] = []
    batch = 8
    batch_fractions = []
    for epoch in range(4):
        indices = sampler.epoch_indices(epoch)
        assert indices == ReplaySampler(train_rows, replay_rows, ratio, seed=11).epoch_indices(epoch)
        replayed = [i - train_rows for i in indices if i >= train_rows]
        # Every training row once; the replay fraction is the ratio up to rounding one row.
        assert sorted(i for i in indices if i < train_rows) == list(range(train_rows))
        assert abs(len(replayed) / len(indices) - ratio) <= 1 / len(indices)
        seen += replayed
        batch_fractions += [
            sum(i >= train_rows for i in indices[k : k + batch]) / batch
            for k in range(0, len(indices) - batch + 1, batch)
        ]
    assert sampler.epoch_indices(0) != ReplaySampler(train_rows, replay_rows, ratio, seed=12).epoch_indices(0)
    assert sampler.epoch_indices(0) != sampler.epoch_indices(1)
    # Replay rows are taken in passes: no row twice before every row once.
    counts = np.bincount(seen, minlength=replay_rows)
    assert counts.max() - counts.min() <= 1, counts
    # A batch's replay fraction is the ratio on average (hypergeometric: within 4 standard errors).
    mean, spread = float(np.mean(batch_fractions)), math.sqrt(ratio * (1 - ratio) / batch / len(batch_fractions))
    assert abs(mean - ratio) < 4 * spread + 1 / len(sampler), (mean, ratio)


# -- the replay and Fisher sources are read as declared ----------------------------------------------


def _write_as(path: Path, file_type: str, rows: list[dict[str, str]]) -> Path:
    if file_type == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif file_type == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif file_type == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("file_type", ["csv", "json", "jsonl", "parquet"])
def test_replay_and_fisher_sources_are_read_as_declared(file_type: str, tmp_path: Path) -> None:
    """replay.source and ewc.fisherData: their declared fileType wins over a misleading extension,
    maxSamples keeps the first records; a bad record fails the run with its file:line."""
    suffix = {"csv": ".parquet", "json": ".csv", "jsonl": ".json", "parquet": ".jsonl"}[file_type]
    replay_rows, fisher_rows = text_rows(6, seed=1), text_rows(5, seed=2)
    replay = _write_as(tmp_path / f"replay{suffix}", file_type, replay_rows)
    fisher = _write_as(tmp_path / f"fisher{suffix}", file_type, fisher_rows)
    train = write_jsonl(tmp_path / "train.jsonl", text_rows(4, seed=3))

    def checked(forgetting: dict[str, Any]) -> pipeline.Checked:
        spec = FineTuneJobSpec.model_validate(
            {
                "model": {"uri": "org/model"},
                "task": {"type": "pretrain"},
                "data": {"train": {"uri": str(train)}, "format": "text"},
                "training": {"maxSteps": 1, "forgetting": forgetting},
            }
        )
        config = TrainerConfig(
            job=JobIdentity(namespace="local", name="data"),
            spec=spec,
            output_dir=str(tmp_path / "out"),
            work_dir=str(tmp_path / "work"),
        )
        return pipeline.check(config, World(0, 0, 1, 1))

    read = checked(
        {
            "replay": {"source": {"uri": str(replay), "fileType": file_type, "maxSamples": 4}},
            "ewc": {"strength": 1.0, "fisherData": {"uri": str(fisher), "fileType": file_type, "maxSamples": 3}},
        }
    )
    assert [json.loads(r)["text"] for r in read.records("replay")["record"]] == [r["text"] for r in replay_rows[:4]]
    assert [json.loads(r)["text"] for r in read.records("fisher")["record"]] == [r["text"] for r in fisher_rows[:3]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"words": "no text column"}])
    with pytest.raises(pipeline.DataError, match=re.escape(f"{bad}:2")):
        checked({"replay": {"source": {"uri": str(bad)}}})
    with pytest.raises(pipeline.DataError, match=re.escape(f"{bad}:2")):
        checked({"ewc": {"strength": 1.0, "fisherData": {"uri": str(bad)}}})


# -- EWC against no EWC, one process ------------------------------------------------------------------


def _anchor_dir(result: RunResult, name: str) -> Path:
    """Where a run's anchor is kept: beside its checkpoints (`finetune run`'s default checkpoint store)."""
    return result.workdir / "storage" / "local" / name / "ewc-anchor"


def _adapter(result: RunResult, name: str) -> dict[str, torch.Tensor]:
    found = sorted((result.workdir / "storage" / "local" / name / "output").rglob("adapter_model.safetensors"))
    assert found, f"no adapter under {result.workdir}"
    return load_file(str(found[0]))


def _distance(anchor: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> float:
    """Σ F·(θ - θ₀)² of a saved adapter (peft saves the names without the adapter's ``.default``)."""
    total = 0.0
    for key, fisher in anchor.items():
        if not key.startswith("fisher/"):
            continue
        name = key.removeprefix("fisher/")
        theta = adapter[name.replace(".default.", ".")]
        total += float((fisher * (theta.float() - anchor[f"theta0/{name}"]).square()).sum())
    return total


@pytest.fixture(scope="module")
def one_process_runs(tiny_model: Path, train_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same SFT run without EWC and replay, with EWC, and with replay (one process)."""
    import subprocess
    import sys

    import tiny

    tmp = tmp_path_factory.mktemp("ewc-one-process")
    general = write_jsonl(tmp / "general.jsonl", text_rows(48, seed=21))
    replay = write_jsonl(tmp / "replay.jsonl", text_rows(60, seed=22))  # other general text
    out: dict[str, Any] = {"general": general}
    for name, forgetting in (
        ("plain", {"generalEval": {"uri": str(general)}}),
        (
            "ewc",
            {
                "generalEval": {"uri": str(general)},
                "ewc": {"strength": STRENGTH, "fisherSamples": 32, "fisherData": {"uri": str(general)}},
            },
        ),
        ("replay", {"generalEval": {"uri": str(general)}, "replay": {"source": {"uri": str(replay)}, "ratio": 0.3}}),
    ):
        job = job_manifest(
            name,
            tiny_model,
            train_jsonl,
            training__maxSteps=STEPS,
            training__learningRate=5e-3,
            training__forgetting=forgetting,
        )
        job_file = tiny.write_manifest(tmp / f"{name}.yaml", job)
        workdir = tmp / f"run-{name}"
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("finetune")), "run", str(job_file), "--workdir", str(workdir)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        out[name] = RunResult(proc.returncode, proc.stdout + proc.stderr, workdir)
    return out


def test_ewc_moves_the_parameters_less_and_forgets_less(one_process_runs: dict[str, Any]) -> None:
    plain, with_ewc = one_process_runs["plain"], one_process_runs["ewc"]
    assert plain.returncode == 0, plain.output[-5000:]
    assert with_ewc.returncode == 0, with_ewc.output[-5000:]
    assert "ewc: the Fisher information of" in with_ewc.output
    assert "estimated on 32 samples of spec.training.forgetting.ewc.fisherData" in with_ewc.output
    anchor = load_file(str(_anchor_dir(with_ewc, "ewc") / "anchor.safetensors"))
    marker = json.loads((_anchor_dir(with_ewc, "ewc") / "anchor.json").read_text())
    assert marker["samples"] == 32
    moved = {name: _distance(anchor, _adapter(run, name)) for name, run in (("plain", plain), ("ewc", with_ewc))}
    summaries = {name: run.summary() for name, run in (("plain", plain), ("ewc", with_ewc))}
    perplexity = {name: s["after"]["general_perplexity"] for name, s in summaries.items()}
    before = summaries["plain"]["before"]["general_perplexity"]
    print(
        f"Fisher-weighted distance to θ₀: without EWC {moved['plain']:.4g}, with EWC {moved['ewc']:.4g}; "
        f"general perplexity {before:.3f} before, after: without EWC {perplexity['plain']:.3f}, "
        f"with EWC {perplexity['ewc']:.3f}"
    )
    assert summaries["ewc"]["before"]["general_perplexity"] == pytest.approx(before)
    assert summaries["plain"]["steps"] == summaries["ewc"]["steps"] == STEPS
    assert moved["ewc"] < 0.5 * moved["plain"], moved
    assert perplexity["plain"] > before  # the plain run forgets...
    assert perplexity["ewc"] < perplexity["plain"], perplexity  # ...and EWC forgets less
    # The penalty is logged with the loss: the term added, λ/2 · Σ F·(θ - θ₀)², 0 at the first step.
    records = [r for r in read_metrics(with_ewc.workdir) if "loss" in r]
    penalties = [r["ewc_penalty"] for r in records]
    assert len(penalties) == STEPS and penalties[0] == 0.0 and max(penalties) > 0
    assert all("ewc_penalty" not in r for r in read_metrics(plain.workdir))
    assert penalties[-1] == pytest.approx(
        STRENGTH / 2 * moved["ewc"], rel=0.5
    )  # the last logged (before the last step)


def test_replay_forgets_less(one_process_runs: dict[str, Any]) -> None:
    """The same run with 30% of its rows replayed general text keeps general perplexity lower."""
    plain, replayed = one_process_runs["plain"], one_process_runs["replay"]
    assert replayed.returncode == 0, replayed.output[-5000:]
    after = {
        name: run.summary()["after"]["general_perplexity"] for name, run in (("plain", plain), ("replay", replayed))
    }
    print(f"general perplexity after training: without replay {after['plain']:.3f}, with replay {after['replay']:.3f}")
    assert after["replay"] < after["plain"], after
    # 400 training rows and round(0.3 / 0.7 * 400) = 171 replay rows an epoch: 72 steps of 8 (not 50).
    first = next(r for r in read_metrics(replayed.workdir) if r.get("step") == 1 and "loss" in r)
    assert first["epoch"] == pytest.approx(1 / 72)


# -- EWC and replay under torchrun, 2 ranks: the same Fisher, and an exact resume -----------------------


def test_two_ranks_share_the_fisher_and_resume_exactly(
    one_process_runs: dict[str, Any],
    tiny_model: Path,
    tmp_path: Path,
    finetune_run: Callable[..., RunResult],
) -> None:
    general = one_process_runs["general"]
    # 80 training rows and round(0.2 / 0.8 * 80) = 20 replay rows an epoch: 50 rows a rank, 7 steps of 8.
    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(80, seed=4))
    replay = write_jsonl(tmp_path / "replay.jsonl", text_rows(30, seed=8))
    forgetting = {
        "replay": {"source": {"uri": str(replay)}, "ratio": 0.2},
        "ewc": {"strength": STRENGTH, "fisherSamples": 32, "fisherData": {"uri": str(general)}},
    }

    def job(name: str) -> dict[str, Any]:
        return job_manifest(
            name,
            tiny_model,
            train,
            training__maxSteps=STEPS,
            training__learningRate=5e-3,
            training__forgetting=forgetting,
            checkpoint={"everySteps": 4, "keepLast": 2},
        )

    reference = finetune_run(job("reference"), "--nproc", "2")
    assert reference.returncode == 0, reference.output[-5000:]
    # Every rank took its share of the 32 samples: the sums all-reduced are the one-process Fisher.
    two = load_file(str(_anchor_dir(reference, "reference") / "anchor.safetensors"))
    one = load_file(str(_anchor_dir(one_process_runs["ewc"], "ewc") / "anchor.safetensors"))
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-9)
    assert reference.summary()["steps"] == STEPS
    expected = {int(r["step"]): r for r in read_metrics(reference.workdir) if "loss" in r}
    assert expected[7]["epoch"] == pytest.approx(1.0) and expected[21]["epoch"] == pytest.approx(3.0)

    stopped = finetune_run(job("victim"), "--nproc", "2", env={NONFINITE_LOSS_AT_STEP: "11"})
    assert stopped.returncode == 4, stopped.output[-5000:]
    store = stopped.workdir / "storage" / "local" / "victim"
    anchor_file = store / "ewc-anchor" / "anchor.safetensors"
    written = (anchor_file.stat().st_mtime_ns, anchor_file.read_bytes())
    rerun = finetune_run(job("victim"), "--nproc", "2")
    assert rerun.returncode == 0, rerun.output[-5000:]
    assert "resuming from" in rerun.output and "(step 8" in rerun.output, rerun.output[-3000:]
    assert f"ewc: the Fisher information and θ₀ read from {store / 'ewc-anchor'} (not estimated again)" in rerun.output
    assert "ewc: the Fisher information of" not in rerun.output.split("resuming from")[-1]
    assert (anchor_file.stat().st_mtime_ns, anchor_file.read_bytes()) == written
    resumed = [r for r in read_metrics(rerun.workdir) if "loss" in r and r["step"] > 8]
    resumed_steps = [int(r["step"]) for r in resumed]
    assert resumed_steps[-(STEPS - 8) :] == list(range(9, STEPS + 1)), resumed_steps
    for r in resumed[-(STEPS - 8) :]:
        step = int(r["step"])
        assert abs(r["loss"] - expected[step]["loss"]) < 1e-4, (step, r["loss"], expected[step]["loss"])
        assert abs(r["ewc_penalty"] - expected[step]["ewc_penalty"]) < 1e-4 * max(1.0, expected[step]["ewc_penalty"])


# -- the preflight checks the replay and Fisher data, and counts the replay rows -------------------------


def test_preflight_checks_the_replay_and_fisher_data(tmp_path: Path, tiny_model: Path) -> None:
    from finetune_operator.api.trainer_config import EXIT_INVALID_DATA, EXIT_OK, build_trainer_config
    from finetune_operator.api.v1alpha1 import FineTuneJob
    from finetune_trainer import preflight

    def outcome(name: str, forgetting: dict[str, Any]) -> preflight.Outcome:
        train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(40, seed=1))
        job = FineTuneJob.model_validate(job_manifest(name, tiny_model, train, training__forgetting=forgetting))
        config = build_trainer_config(
            job,
            namespace="local",
            base_dir=tmp_path,
            default_storage=str(tmp_path / "storage"),
            work_dir=tmp_path / name,
        )
        return preflight.preflight(config)

    rows = [json.dumps(r) for r in text_rows(6, seed=2)]
    rows[3] = json.dumps({"text": ""})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    for name, forgetting in (
        ("bad-replay", {"replay": {"source": {"uri": str(bad)}}}),
        ("bad-fisher", {"ewc": {"strength": 1.0, "fisherData": {"uri": str(bad)}}}),
    ):
        refused = outcome(name, forgetting)
        assert refused.exit_code == EXIT_INVALID_DATA, refused
        assert refused.result.problems is not None and refused.result.problems[0].startswith(f"{bad}:4: "), refused
    replay = write_jsonl(tmp_path / "replay.jsonl", text_rows(10, seed=3))
    good = outcome("good", {"replay": {"source": {"uri": str(replay)}, "ratio": 0.2}, "ewc": {"strength": 1.0}})
    assert good.exit_code == EXIT_OK, good
    # 40 training rows and round(0.2 / 0.8 * 40) = 10 replay rows an epoch: 7 steps of 8 rows (5 without).
    assert good.result.steps_per_epoch == 7
