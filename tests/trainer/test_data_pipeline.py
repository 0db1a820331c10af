"""The data pipeline (finetune_trainer.data.pipeline): records checked in a stream with exact lines,
tokenized in parallel into Arrow, and cached beside the checkpoints on object storage (the S3 server on
loopback) so that a restarted or resumed run never tokenizes again.

Everything runs in this process, as the preflight does: ``pipeline.check`` then ``pipeline.prepare``
with the real tokenizer of the tiny model. The rows must be the very rows the list path makes (the
format modules' per-record functions that the anchors compare with plain HF scripts).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import datasets
import pytest
from finetune_operator.api.trainer_config import JobIdentity, TrainerConfig
from finetune_operator.api.v1alpha1 import DataSource, DataSpec, FineTuneJobSpec, QAParams
from finetune_trainer import storage
from finetune_trainer.data import pipeline, qa
from finetune_trainer.data.classification import build_examples as classification_examples
from finetune_trainer.data.examples import build_examples
from finetune_trainer.data.packing import pack, pack_documents
from finetune_trainer.data.records import DataError, decode_text, load_checked, split_eval
from finetune_trainer.distributed import World
from tiny import chat_rows, classification_rows, prompt_completion_rows, qa_rows, text_rows, write_jsonl
from transformers import AutoTokenizer

ALONE = World(rank=0, local_rank=0, world_size=1, local_world_size=1)
#: Records of the large case, and where its defect is planted.
RECORDS = 100_000
DEEP = 87_654


@pytest.fixture
def bucket(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the loopback S3 server, which this process's clients reach (s3fs, boto3)."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    name = f"data-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def map_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every ``datasets.Dataset.map`` call (the tokenization), counted on its way to the real one."""
    calls: list[str] = []
    original = datasets.Dataset.map

    def counted(self: datasets.Dataset, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(kwargs.get("cache_file_name")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counted)
    yield calls


def config_for(
    tmp_path: Path, data: dict[str, Any], *, checkpoint: str | None, work: str = "work", **spec: Any
) -> TrainerConfig:
    """The trainer config of a job with this ``spec.data`` (and other spec sections), its checkpoints
    (and so its data cache) under ``checkpoint``."""
    full = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "org/model"},
            "task": spec.pop("task", {"type": "pretrain" if data.get("format") == "text" else "sft"}),
            "data": data,
            "training": {"maxSteps": 1, "perDeviceBatchSize": 8, "seed": 7, **spec.pop("training", {})},
            "metrics": {"enabled": False},
            **spec,
        }
    )
    return TrainerConfig(
        job=JobIdentity(namespace="local", name="data"),
        spec=full,
        checkpoint_dir=checkpoint,
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / work),
    )


def ids(dataset: datasets.Dataset, column: str = "input_ids") -> list[Any]:
    return list(dataset[column])


def test_a_defect_deep_in_100k_records_is_found_at_its_line_and_a_second_run_reuses_the_cache(
    tmp_path: Path, tiny_model: Path, bucket: str, map_calls: list[str]
) -> None:
    rows = [json.dumps(r) for r in prompt_completion_rows(RECORDS, seed=3)]
    good = rows[DEEP - 1]
    rows[DEEP - 1] = json.dumps({"prompt": "what color is the plum?"})  # no completion, line DEEP
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert train.stat().st_size > 4 << 20, "the file spans several read chunks"
    checkpoint = f"s3://{bucket}/ckpt/local/data"
    data = {"train": {"uri": str(train)}, "format": "promptCompletion", "maxSeqLength": 32}
    config = config_for(tmp_path, data, checkpoint=checkpoint)
    with pytest.raises(DataError) as info:
        pipeline.check(config, ALONE)
    assert info.value.problems == [f"{train}:{DEEP}: missing column 'completion'"]

    rows[DEEP - 1] = good
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    checked = pipeline.check(config, ALONE)
    assert not checked.known_valid and len(checked.train) == RECORDS
    first = pipeline.prepare(config, tokenizer, world=ALONE, checked=checked)
    stats = first.stats
    assert not stats.cache_hit and map_calls, "the first run tokenizes"
    assert stats.cache_uri is not None and stats.cache_uri.startswith(f"{checkpoint}/data-cache/")
    # The rows are the list path's, in order: every record's tokens, cut at maxSeqLength.
    spec_data = DataSpec.model_validate(data)
    records = load_checked(DataSource(uri=str(train)), "promptCompletion", spec_data.columns)
    expected = build_examples(records, tokenizer, spec_data)
    assert ids(first.train) == [e.input_ids for e in expected]
    assert ids(first.train, "labels") == [e.labels for e in expected]
    whole = [len(e) for e in build_examples(records, tokenizer, spec_data.model_copy(update={"max_seq_length": 10**9}))]
    assert (stats.train_records, stats.eval_records, stats.rows) == (RECORDS, 0, RECORDS)
    assert stats.token_length_max == max(whole)
    assert stats.token_length_p50 == sorted(whole)[RECORDS // 2 - 1]
    assert stats.truncated == sum(n > 32 for n in whole)
    assert stats.tokens_per_epoch == sum(min(n, 32) for n in whole)
    assert stats.steps_per_epoch == RECORDS // 8
    fs, path = storage.filesystem(stats.cache_uri)
    assert fs.exists(f"{path}/COMMITTED")

    # A restarted run (another attempt: a fresh work directory) reads the cache: no record is read, and
    # nothing is tokenized.
    map_calls.clear()
    again = config_for(tmp_path, data, checkpoint=checkpoint, work="work-attempt-2")
    rechecked = pipeline.check(again, ALONE)
    assert rechecked.known_valid and not rechecked.has_records
    second = pipeline.prepare(again, tokenizer, world=ALONE, checked=rechecked)
    assert second.stats.cache_hit and map_calls == []
    assert second.stats == pipeline.DataStats(**{**stats.__dict__, "cache_hit": True})
    assert ids(second.train) == ids(first.train)


def test_a_stream_reports_what_reading_the_whole_file_reports(tmp_path: Path) -> None:
    """A byte that is not UTF-8 several chunks into a file, a NUL byte after it (binary wins, as when the
    whole file is decoded first), and a CRLF file whose last line has no newline."""
    lines = [json.dumps(r) for r in text_rows(60_000, seed=2)]
    body = ("\n".join(lines) + "\n").encode()
    at = body.index(b"\n", 3 << 20) + 1  # a line start past the third megabyte
    bad = body[:at] + b'{"text": "caf\xe9"}\n' + body[at:]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(bad)
    with pytest.raises(DataError) as whole:
        decode_text(str(path), bad)
    with pytest.raises(DataError) as streamed:
        load_checked(DataSource(uri=str(path)), "text", DataSpec(train=DataSource(uri="x")).columns)
    assert streamed.value.problems == whole.value.problems
    line = body[:at].count(b"\n") + 1
    assert streamed.value.problems[0].startswith(f"{path}:{line}: not UTF-8 text: byte 0xe9")

    binary = bad + b"\x00\n"
    path.write_bytes(binary)
    with pytest.raises(DataError) as whole:
        decode_text(str(path), binary)
    with pytest.raises(DataError) as streamed:
        load_checked(DataSource(uri=str(path)), "text", DataSpec(train=DataSource(uri="x")).columns)
    assert streamed.value.problems == whole.value.problems and "a binary file" in streamed.value.problems[0]

    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b"\r\n".join(line.encode() for line in lines[:5]))
    records = load_checked(DataSource(uri=str(crlf)), "text", DataSpec(train=DataSource(uri="x")).columns)
    assert [r.line for r in records] == [1, 2, 3, 4, 5]
    assert [r.data for r in records] == [json.loads(line) for line in lines[:5]]


def test_a_partly_written_cache_is_never_read_and_deleting_the_cache_is_safe(
    tmp_path: Path, tiny_model: Path, bucket: str, map_calls: list[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(300, seed=4))
    data = {"train": {"uri": str(train)}, "format": "promptCompletion", "maxSeqLength": 32, "packing": True}
    checkpoint = f"s3://{bucket}/ckpt/local/data"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    built = pipeline.prepare(config_for(tmp_path, data, checkpoint=checkpoint), tokenizer, world=ALONE)
    uri = built.stats.cache_uri
    assert uri is not None
    fs, path = storage.filesystem(uri)

    # Killed mid-write: the marker goes last, so without it the cache is not there.
    fs.rm_file(f"{path}/COMMITTED")
    map_calls.clear()
    rebuilt = pipeline.prepare(config_for(tmp_path, data, checkpoint=checkpoint, work="w2"), tokenizer, world=ALONE)
    assert not rebuilt.stats.cache_hit and map_calls
    assert ids(rebuilt.train, "position_ids") == ids(built.train, "position_ids")

    # The whole cache deleted: the next run builds it again, the same rows.
    fs.rm(f"s3://{bucket}/ckpt/local/data/data-cache", recursive=True)
    map_calls.clear()
    again = pipeline.prepare(config_for(tmp_path, data, checkpoint=checkpoint, work="w3"), tokenizer, world=ALONE)
    assert not again.stats.cache_hit and map_calls and ids(again.train) == ids(built.train)

    # Another tokenizer is another cache (the data is known valid: it is not checked again).
    tokenizer.add_tokens(["<fruit>"])
    checked = pipeline.check(config_for(tmp_path, data, checkpoint=checkpoint, work="w4"), ALONE)
    assert checked.known_valid
    other = pipeline.prepare(
        config_for(tmp_path, data, checkpoint=checkpoint, work="w4"), tokenizer, world=ALONE, checked=checked
    )
    assert not other.stats.cache_hit and other.stats.cache_uri != uri


def _cases() -> dict[str, tuple[dict[str, Any], dict[str, Any], Any]]:
    """(spec.data, other spec sections, rows writer) per case, each a different tokenization."""
    return {
        "prompt-completion-packed-eval-split": (
            {"format": "promptCompletion", "maxSeqLength": 48, "packing": True, "evalSplit": 0.2},
            {},
            lambda: prompt_completion_rows(150, seed=1),
        ),
        "chat-completion-only": ({"format": "chat", "maxSeqLength": 40}, {}, lambda: chat_rows(60, seed=2)),
        "text-packed-documents": (
            {"format": "text", "maxSeqLength": 32, "packing": True},
            {},
            lambda: text_rows(80, seed=3),
        ),
        "classification-multi-label": (
            {"format": "classification", "maxSeqLength": 16},
            {
                "task": {
                    "type": "classification",
                    "classification": {
                        "numLabels": 5,
                        "labels": ["red", "yellow", "purple", "orange", "green"],
                        "multiLabel": True,
                    },
                }
            },
            lambda: classification_rows(70, seed=4, multi_label=True),
        ),
        "qa-windows": (
            {"format": "qa", "maxSeqLength": 32},
            {"task": {"type": "qa", "qa": {"docStride": 8}}},
            lambda: qa_rows(40, seed=5, fruits=4, unanswerable=0.25),
        ),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_the_pipeline_makes_the_rows_of_the_list_path(tmp_path: Path, tiny_model: Path, case: str) -> None:
    data, spec, rows = _cases()[case]
    train = write_jsonl(tmp_path / "train.jsonl", rows())
    data = {"train": {"uri": str(train)}, **data}
    config = config_for(tmp_path, data, checkpoint=str(tmp_path / "ckpt"), **spec)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    got = pipeline.prepare(config, tokenizer, world=ALONE)
    d = config.spec.data
    records = load_checked(DataSource(uri=str(train)), d.format, d.columns, task=config.spec.task)
    held: list[Any] = []
    if d.eval_split:
        records, held = split_eval(records, d.eval_split, config.spec.training.seed)
    if d.format == "qa":
        params = config.spec.task.qa or QAParams()
        windows = qa.windows(records, tokenizer, d, params)
        assert ids(got.train) == [w.input_ids for w in windows]
        assert ids(got.train, "start_positions") == [w.start for w in windows]
        assert got.allow_null
        return
    if d.format == "classification":
        expected = classification_examples(records, tokenizer, d, config.spec.task)
        assert ids(got.train) == [e.input_ids for e in expected]
        assert ids(got.train, "labels") == [e.label for e in expected]
        return
    if d.packing and d.format == "text":
        rows_expected = pack_documents(records, tokenizer, d)
    elif d.packing:
        rows_expected = pack(build_examples(records, tokenizer, d), d.max_seq_length)
    else:
        rows_expected = build_examples(records, tokenizer, d)
    assert ids(got.train) == [r.input_ids for r in rows_expected]
    assert ids(got.train, "labels") == [r.labels for r in rows_expected]
    if d.packing:
        assert ids(got.train, "position_ids") == [r.position_ids for r in rows_expected]
    if held:
        assert got.eval is not None
        assert ids(got.eval) == [e.input_ids for e in build_examples(held, tokenizer, d)]
        assert got.stats.eval_records == len(held)
