"""The preflight (`python -m finetune_trainer preflight`) on tiny models: its statistics against what the
test computes from the tokenizer itself, bad data and refused writes with their exit codes and
messages, the termination message, and a model in object storage read without its weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiny
from finetune_operator.api.memory import estimate
from finetune_operator.api.trainer_config import (
    EXIT_INVALID_CONFIG,
    EXIT_INVALID_DATA,
    EXIT_OK,
    TrainerConfig,
    build_trainer_config,
)
from finetune_operator.api.v1alpha1 import FineTuneJob, PreflightResult
from finetune_trainer import preflight
from transformers import AutoTokenizer

PREFLIGHT_TIMEOUT = 300


def nearest_rank(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def config_for(tmp_path: Path, manifest: dict[str, Any]) -> TrainerConfig:
    job = FineTuneJob.model_validate(manifest)
    return build_trainer_config(
        job,
        namespace="local",
        base_dir=tmp_path,
        default_storage=str(tmp_path / "storage"),
        work_dir=tmp_path / "work",
    )


def run_preflight(
    tmp_path: Path, config: TrainerConfig, env: dict[str, str] | None = None
) -> tuple[int, PreflightResult, str, str]:
    """`python -m finetune_trainer preflight` as the operator's pod runs it: (exit code, the result of
    its last stdout line, the termination message, stderr). The --result file must hold the same."""
    config_file = tmp_path / "trainer-config.json"
    config_file.write_text(config.dumps())
    termination, result_file = tmp_path / "termination-log", tmp_path / "result.json"
    argv = [sys.executable, "-m", "finetune_trainer", "preflight", "--config", str(config_file)]
    proc = subprocess.run(
        [*argv, "--result", str(result_file)],
        env={**os.environ, "FINETUNE_TERMINATION_LOG": str(termination), **(env or {})},
        capture_output=True,
        text=True,
        timeout=PREFLIGHT_TIMEOUT,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = PreflightResult.model_validate_json(last)
    assert PreflightResult.model_validate_json(result_file.read_text()) == result
    return proc.returncode, result, termination.read_text(), proc.stderr


def test_statistics_are_those_of_the_tokenizer(tmp_path: Path, tiny_model: Path) -> None:
    rows = tiny.prompt_completion_rows(37, seed=3)
    for i in range(0, 37, 5):  # some records longer than maxSeqLength
        rows[i]["completion"] += " and it is a fruit that grows on a tree" * 3
    train = tiny.write_jsonl(tmp_path / "train.jsonl", rows)
    manifest = tiny.job_manifest(
        "stats",
        tiny_model,
        train,
        data__maxSeqLength=24,
        training={"epochs": 2, "learningRate": 1e-3, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2},
    )
    config = config_for(tmp_path, manifest)
    code, result, termination, _ = run_preflight(tmp_path, config)
    assert code == EXIT_OK

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = [
        len(tokenizer(r["prompt"])["input_ids"])
        + len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"])
        + 1  # EOS
        for r in rows
    ]
    cut = [min(n, 24) for n in lengths]
    assert result.train_records == 37 and result.eval_records == 0 and result.bad_records == 0
    assert result.token_length_p50 == nearest_rank(lengths, 0.5)
    assert result.token_length_p95 == nearest_rank(lengths, 0.95)
    assert result.token_length_max == max(lengths)
    assert 0 < sum(n > 24 for n in lengths) < 37
    assert result.truncated_fraction == pytest.approx(sum(n > 24 for n in lengths) / 37)
    assert result.tokens_per_epoch == sum(cut)
    assert result.steps_per_epoch == math.ceil(37 / 4) // 2  # 10 batches of 4, 2 accumulated a step
    assert result.problems == [] and result.completed_at is not None
    assert result.write_access == [config.checkpoint_dir, config.output_dir]
    assert not [p for p in Path(config.output_dir).iterdir()]  # the probe object is deleted

    job = FineTuneJob.model_validate(manifest)
    cfg = json.loads((tiny_model / "config.json").read_text())
    expected = estimate(cfg, job.spec, world_size=1, tokenizer_length=len(tokenizer), device="cpu")
    assert result.memory is not None
    assert result.memory.model_dump(by_alias=True, exclude_none=True) == expected.to_dict()
    # The termination message is the same result, compact, as the operator reads it from the pod.
    from finetune_operator.reconcile import parse_preflight_result

    assert len(termination.encode()) < 4096
    assert PreflightResult.model_validate_json(termination) == result
    assert parse_preflight_result(termination) == result
    # The tokenized cache is built beside the checkpoints; a second preflight (or the run) reads it.
    assert result.cache_uri is not None and result.cache_uri.startswith(f"{config.checkpoint_dir}/data-cache/")
    assert not result.cache_hit
    code, again, _, _ = run_preflight(tmp_path, config)
    assert code == EXIT_OK and again.cache_hit and again.cache_uri == result.cache_uri
    fields = ("token_length_p50", "token_length_p95", "token_length_max", "tokens_per_epoch", "steps_per_epoch")
    assert [getattr(again, f) for f in fields] == [getattr(result, f) for f in fields]


def _stats(tmp_path: Path, manifest: dict[str, Any]) -> PreflightResult:
    outcome = preflight.preflight(config_for(tmp_path, manifest))
    assert outcome.exit_code == EXIT_OK, outcome.reason
    return outcome.result


def test_chat_records_are_measured_as_rendered_by_the_chat_template(tmp_path: Path, tiny_model: Path) -> None:
    rows = tiny.chat_rows(20, seed=1)
    train = tiny.write_jsonl(tmp_path / "chat.jsonl", rows)
    manifest = tiny.job_manifest("chat", tiny_model, train, data__format="chat", data__maxSeqLength=40)
    result = _stats(tmp_path, manifest)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rendered = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered]
    assert result.token_length_max == max(lengths) and result.token_length_p50 == nearest_rank(lengths, 0.5)
    assert result.truncated_fraction == pytest.approx(sum(n > 40 for n in lengths) / 20)
    assert result.tokens_per_epoch == sum(min(n, 40) for n in lengths)


def test_packed_text_is_cut_into_blocks_and_nothing_is_truncated(tmp_path: Path, tiny_model: Path) -> None:
    rows = tiny.text_rows(30, seed=2)
    train = tiny.write_jsonl(tmp_path / "text.jsonl", rows)
    manifest = tiny.job_manifest(
        "packed",
        tiny_model,
        train,
        task={"type": "pretrain"},
        data__format="text",
        data__packing=True,
        data__maxSeqLength=32,
        training__perDeviceBatchSize=2,
    )
    result = _stats(tmp_path, manifest)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = [len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows]
    assert max(lengths) > 32  # documents longer than a block: cut, not truncated
    assert result.truncated_fraction == 0.0 and result.token_length_max == max(lengths)
    assert result.tokens_per_epoch == sum(lengths)
    blocks = math.ceil(sum(lengths) / 32)
    assert result.steps_per_epoch == math.ceil(blocks / 2)


def test_classification_and_qa_rows(tmp_path: Path, tiny_model: Path) -> None:
    rows = tiny.classification_rows(25, seed=4)
    train = tiny.write_jsonl(tmp_path / "cls.jsonl", rows)
    classes = {"numLabels": len(tiny.COLORS), "labels": tiny.COLORS, "resampling": "oversample"}
    manifest = tiny.job_manifest(
        "cls",
        tiny_model,
        train,
        task={"type": "classification", "classification": classes},
        data__format="classification",
        data__maxSeqLength=16,
    )
    result = _stats(tmp_path / "cls", manifest)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = [len(tokenizer(r["text"])["input_ids"]) for r in rows]
    assert result.token_length_max == max(lengths)
    counts = [sum(r["label"] == c for r in rows) for c in tiny.COLORS]
    resampled = max(counts) * sum(1 for c in counts if c)  # every present class as often as the largest
    assert result.steps_per_epoch == math.ceil(resampled / 8)

    qa_rows = tiny.qa_rows(12, seed=5)
    qa_train = tiny.write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    qa_manifest = tiny.job_manifest(
        "qa",
        tiny_model,
        qa_train,
        task={"type": "qa", "qa": {"docStride": 4}},
        data__format="qa",
        data__maxSeqLength=24,
        training__perDeviceBatchSize=2,
    )
    qa = _stats(tmp_path / "qa", qa_manifest)
    pairs = [tokenizer(r["question"], r["context"])["input_ids"] for r in qa_rows]
    windows = tokenizer(
        [r["question"] for r in qa_rows],
        [r["context"] for r in qa_rows],
        truncation="only_second",
        max_length=24,
        stride=4,
        return_overflowing_tokens=True,
    )["input_ids"]
    assert max(len(p) for p in pairs) > 24 and qa.token_length_max == max(len(p) for p in pairs)
    assert qa.truncated_fraction == 0.0  # long contexts become windows
    assert qa.tokens_per_epoch == sum(len(w) for w in windows)
    assert qa.steps_per_epoch == math.ceil(len(windows) / 2)


def test_a_bad_record_exits_3_with_its_file_and_line(tmp_path: Path, tiny_model: Path) -> None:
    rows = [json.dumps(r) for r in tiny.prompt_completion_rows(12)]
    rows[6] = json.dumps({"prompt": "what color is the plum?", "completion": ""})
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    config = config_for(tmp_path, tiny.job_manifest("bad", tiny_model, train))
    code, result, termination, stderr = run_preflight(tmp_path, config)
    expected = f"{train}:7: column 'completion' must be a non-empty string"
    assert code == EXIT_INVALID_DATA
    assert result.problems == [expected] and result.bad_records == 1
    assert stderr.strip().splitlines()[-1] == expected
    assert PreflightResult.model_validate_json(termination).problems == [expected]
    assert result.memory is None  # refused before the model was looked at


def test_the_termination_message_stays_under_4096_bytes(tmp_path: Path, tiny_model: Path) -> None:
    rows = [{"prompt": "p" * 40, "completion": ""} for _ in range(500)]
    train = tiny.write_jsonl(tmp_path / "many-bad.jsonl", rows)
    config = config_for(tmp_path, tiny.job_manifest("many-bad", tiny_model, train))
    code, result, termination, _ = run_preflight(tmp_path, config)
    assert code == EXIT_INVALID_DATA
    assert result.bad_records == 500 and len(result.problems) == preflight.MAX_PROBLEMS
    assert result.problems[0] == f"{train}:1: column 'completion' must be a non-empty string"
    assert len(termination.encode()) < 4096
    kept = PreflightResult.model_validate_json(termination)
    assert kept.bad_records == 500 and kept.problems == result.problems[: len(kept.problems)]
    # A long problem list is cut to fit.
    long = result.model_copy(update={"problems": [f"{train}:{i}: " + "x" * 1500 for i in range(20)]})
    text = preflight.termination_text(long)
    assert len(text.encode()) < 4096 and 0 < len(json.loads(text)["problems"]) < 20


def test_a_refused_write_exits_2_naming_the_field(
    tmp_path: Path, tiny_model: Path, s3_env: dict[str, str], s3_endpoint: str
) -> None:
    import live

    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(8))
    manifest = tiny.job_manifest("probe", tiny_model, train, checkpoint={"uri": "s3://no-such-bucket/ckpt"})
    code, result, termination, stderr = run_preflight(tmp_path, config_for(tmp_path, manifest), env=s3_env)
    assert code == EXIT_INVALID_CONFIG
    [problem] = result.problems
    assert problem.startswith("spec.checkpoint.uri: cannot write to s3://no-such-bucket/ckpt/local/probe: "), problem
    assert stderr.strip().splitlines()[-1] == f"invalid configuration: {problem}"
    assert PreflightResult.model_validate_json(termination).problems == [problem]

    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    manifest = tiny.job_manifest("probe", tiny_model, train, output={"uri": str(a_file / "out")})
    code, result, _, _ = run_preflight(tmp_path, config_for(tmp_path, manifest))
    assert code == EXIT_INVALID_CONFIG
    assert result.problems[0].startswith(f"spec.output.uri: cannot write to {a_file / 'out'}: ")

    # A bucket that exists: the probe objects are deleted; what stays is the tokenized cache.
    s3 = live.s3_client(s3_endpoint)
    s3.create_bucket(Bucket="probed")
    manifest = tiny.job_manifest("probe", tiny_model, train, checkpoint={"uri": "s3://probed/ckpt", "everySteps": 5})
    code, result, _, _ = run_preflight(tmp_path, config_for(tmp_path, manifest), env=s3_env)
    assert code == EXIT_OK, result.problems
    assert "s3://probed/ckpt/local/probe" in result.write_access
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="probed").get("Contents", [])]
    assert keys and all(k.startswith("ckpt/local/probe/data-cache/") for k in keys), keys


def test_a_model_in_object_storage_is_read_without_its_weights(
    tmp_path: Path, tiny_model: Path, s3_env: dict[str, str], s3_endpoint: str
) -> None:
    import live

    s3 = live.s3_client(s3_endpoint)
    s3.create_bucket(Bucket="models")
    uploaded = sorted(p.name for p in tiny_model.iterdir())
    for path in tiny_model.iterdir():
        s3.upload_file(str(path), "models", f"tiny/{path.name}")
    assert "model.safetensors" in uploaded
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(8))
    manifest = tiny.job_manifest("remote-model", "s3://models/tiny", train)
    config = config_for(tmp_path, manifest)
    code, result, _, stderr = run_preflight(tmp_path, config, env=s3_env)
    assert code == EXIT_OK, stderr[-3000:]
    assert result.memory is not None and result.token_length_max

    cache = Path(config.work_dir) / "cache"
    fetched = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert fetched == [n for n in uploaded if n != "model.safetensors"], fetched  # config and tokenizer files only
    assert not (cache / "models").exists()  # the training cache stays untouched


def test_an_architecture_the_estimator_does_not_model_gives_a_note(tmp_path: Path) -> None:
    # Only the config and the tokenizer are read: a model directory without weights passes.
    from transformers import GPT2Config

    model = tmp_path / "gpt2-no-weights"
    tokenizer = tiny.build_tokenizer()
    tokenizer.save_pretrained(model)
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer)).save_pretrained(model)
    assert not [p for p in model.iterdir() if p.suffix in (".safetensors", ".bin")]
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(8))
    result = _stats(tmp_path, tiny.job_manifest("gpt2", model, train))
    assert result.memory is None
    assert result.memory_note is not None and "model_type 'gpt2' is not modeled" in result.memory_note
    assert result.train_records == 8 and result.steps_per_epoch == 1


def test_a_model_needing_its_own_code_is_refused_naming_trust_remote_code(tmp_path: Path, tiny_with_code: Path) -> None:
    """The config alone tells that the model needs its own code: refused before training, exit 2, naming
    spec.model.trustRemoteCode (not a generic unreadable model)."""
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(8))
    code, result, _, _ = run_preflight(tmp_path, config_for(tmp_path, tiny.job_manifest("code", tiny_with_code, train)))
    assert code == EXIT_INVALID_CONFIG
    [problem] = result.problems
    assert problem.startswith("spec.model.trustRemoteCode: "), problem
