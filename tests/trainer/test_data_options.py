"""spec.data's options reach the records and token rows a run trains on: renamed columns, declared file
types, record limits, the system prompt, and packing.

The records are read by the harness's own :meth:`~finetune_trainer.harness.Run.read_data` (train, eval
and general-eval data, as a run reads them), and tokenized by the format modules the recipe calls.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from finetune_operator.api.trainer_config import JobIdentity, TrainerConfig
from finetune_operator.api.v1alpha1 import ColumnMapping, DataSource, DataSpec, FineTuneJobSpec
from finetune_trainer import harness
from finetune_trainer.data import chat, pipeline
from finetune_trainer.data.examples import IGNORE, build_examples
from finetune_trainer.data.packing import pack
from finetune_trainer.data.records import DataError, Record, load_checked
from runs import RunResult
from tiny import chat_rows, job_manifest, prompt_completion_rows, text_rows, write_jsonl
from transformers import AutoTokenizer


def read_data(tmp_path: Path, data: dict[str, Any], general: dict[str, Any] | None = None) -> pipeline.Checked:
    """The records a run of this ``spec.data`` (and general-eval source) reads, as the harness reads them."""
    training: dict[str, Any] = {"maxSteps": 1}
    if general is not None:
        training["forgetting"] = {"generalEval": general}
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "org/model"},
            "task": {"type": "pretrain" if data.get("format") == "text" else "sft"},
            "data": data,
            "training": training,
            "metrics": {"enabled": False},
        }
    )
    config = TrainerConfig(
        job=JobIdentity(namespace="local", name="data"),
        spec=spec,
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
    )
    return harness.Run(config).read_data()


def texts(records: list[Record], column: str = "text") -> list[str]:
    return [r.data[column] for r in records]


# -- spec.data.columns ------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["messages", "text"])
def test_renamed_columns_are_read(column: str, tmp_path: Path, tiny_model: Path) -> None:
    """A dataset whose column has another name trains once spec.data.columns names it: the records are
    read, and their token rows hold that column's content."""
    fmt, rows = ("chat", chat_rows(4)) if column == "messages" else ("text", text_rows(4))
    renamed = [{"record_" + column: row[column]} for row in rows]
    train = write_jsonl(tmp_path / "train.jsonl", renamed)
    data: dict[str, Any] = {"train": {"uri": str(train)}, "format": fmt, "maxSeqLength": 512}
    with pytest.raises(DataError, match=f"no record has a column '{column}'"):
        read_data(tmp_path, data)  # the default name is not there

    data["columns"] = {column: "record_" + column}
    records = read_data(tmp_path, data).train
    assert [r.data for r in records] == renamed
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = build_examples(records, tokenizer, DataSpec.model_validate(data))
    for row, example in zip(rows, examples, strict=True):
        decoded = tokenizer.decode(example.input_ids)
        wanted = [m["content"] for m in row["messages"]] if column == "messages" else [row["text"]]
        assert all(content in decoded for content in wanted), decoded


# -- spec.data.{train,eval}.fileType, spec.training.forgetting.generalEval.fileType -----------------


def write_as(path: Path, file_type: str, rows: list[dict[str, str]]) -> Path:
    """``rows`` written in ``file_type``, whatever ``path``'s extension says."""
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


#: Each declared type is written under the extension of another type, which `auto` would read it as.
MISLEADING_SUFFIX = {"csv": ".parquet", "json": ".csv", "jsonl": ".json", "parquet": ".jsonl"}


@pytest.mark.parametrize("file_type", ["csv", "json", "jsonl", "parquet"])
def test_a_declared_file_type_wins_over_the_extension(file_type: str, tmp_path: Path) -> None:
    """Train, eval and general-eval files with a misleading extension are read as their declared
    fileType (with `auto`, the extension decides and the same files are unreadable)."""
    suffix = MISLEADING_SUFFIX[file_type]
    rows = {name: text_rows(n, seed=seed) for name, n, seed in (("train", 5, 1), ("eval", 3, 2), ("general", 2, 3))}
    paths = {name: write_as(tmp_path / f"{name}{suffix}", file_type, r) for name, r in rows.items()}

    data = {
        "train": {"uri": str(paths["train"]), "fileType": file_type},
        "eval": {"uri": str(paths["eval"]), "fileType": file_type},
        "format": "text",
    }
    read = read_data(tmp_path, data, {"uri": str(paths["general"]), "fileType": file_type})
    assert texts(read.train) == texts_of(rows["train"])
    assert texts(read.eval) == texts_of(rows["eval"])
    assert texts(read.general) == texts_of(rows["general"])
    for path in paths.values():  # read by their extension, the same files are not text records
        with pytest.raises(DataError, match=re.escape(str(path))):
            load_checked(DataSource(uri=str(path)), "text", ColumnMapping())


def texts_of(rows: list[dict[str, str]]) -> list[str]:
    return [r["text"] for r in rows]


# -- spec.data.{train,eval}.maxSamples, spec.training.forgetting.generalEval.maxSamples -----------------


def test_max_samples_limits_the_records_read(tmp_path: Path) -> None:
    """Each source's maxSamples keeps its first records only."""
    rows = {name: text_rows(n, seed=seed) for name, n, seed in (("train", 10, 1), ("eval", 8, 2), ("general", 6, 3))}
    paths = {name: write_jsonl(tmp_path / f"{name}.jsonl", r) for name, r in rows.items()}
    data = {
        "train": {"uri": str(paths["train"]), "maxSamples": 4},
        "eval": {"uri": str(paths["eval"]), "maxSamples": 3},
        "format": "text",
    }
    read = read_data(tmp_path, data, {"uri": str(paths["general"]), "maxSamples": 2})
    assert texts(read.train) == texts_of(rows["train"][:4])
    assert texts(read.eval) == texts_of(rows["eval"][:3])
    assert texts(read.general) == texts_of(rows["general"][:2])
    unlimited = {"train": {"uri": str(paths["train"])}, "eval": {"uri": str(paths["eval"])}, "format": "text"}
    everything = read_data(tmp_path, unlimited, {"uri": str(paths["general"])})
    assert (len(everything.train), len(everything.eval), len(everything.general)) == (10, 8, 6)


# -- spec.data.systemPrompt -----------------------------------------------------------------------------


def test_system_prompt_opens_conversations_that_have_none(tiny_model: Path) -> None:
    """spec.data.systemPrompt is the first turn of the rendered text of a conversation without a system
    message (and takes no loss); a conversation with its own system message keeps it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = DataSpec.model_validate(
        {"train": {"uri": "x"}, "format": "chat", "systemPrompt": "You know fruit.", "maxSeqLength": 512}
    )
    own = chat_rows(1, seed=4)[0]
    without = {"messages": own["messages"][1:]}
    example = chat.example(Record(without, "chat.jsonl", 1), tokenizer, data)
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou know fruit.<|im_end|>\n<|im_start|>user\n"), text
    system_tokens = len(tokenizer("<|im_start|>system\nYou know fruit.<|im_end|>\n")["input_ids"])
    assert example.labels[:system_tokens] == [IGNORE] * system_tokens
    kept = tokenizer.decode(chat.example(Record(own, "chat.jsonl", 2), tokenizer, data).input_ids)
    assert kept.startswith("<|im_start|>system\nanswer about fruit<|im_end|>\n") and "You know fruit." not in kept
    plain = DataSpec.model_validate({"train": {"uri": "x"}, "format": "chat", "maxSeqLength": 512})
    assert tokenizer.decode(chat.example(Record(without, "chat.jsonl", 1), tokenizer, plain).input_ids).startswith(
        "<|im_start|>user\n"
    )


# -- spec.data.packing (and spec.training.epochs) ---------------------------------------------------


def test_packing_packs_the_rows_a_run_trains_on(
    tmp_path: Path, tiny_model: Path, finetune_run: Callable[..., RunResult]
) -> None:
    """With packing, a run trains on rows of several samples: two epochs over 48 samples in batches of 8
    take as many steps as two passes over the packed rows (12 without packing)."""
    samples, batch, epochs, width = 48, 8, 2, 64
    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(samples, seed=5))
    manifest = job_manifest(
        "packing",
        tiny_model,
        train,
        data__packing=True,
        data__maxSeqLength=width,
        training__epochs=epochs,
        training__perDeviceBatchSize=batch,
    )
    del manifest["spec"]["training"]["maxSteps"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = DataSpec.model_validate(manifest["spec"]["data"])
    records = [Record(row, str(train), i + 1) for i, row in enumerate(prompt_completion_rows(samples, seed=5))]
    rows = len(pack(build_examples(records, tokenizer, data), width))
    assert rows <= samples // 3, f"{rows} packed rows: the samples are too long to show packing"

    result = finetune_run(manifest)
    assert result.returncode == 0, result.output[-5000:]
    steps = result.summary()["steps"]
    assert steps == epochs * math.ceil(rows / batch) < epochs * math.ceil(samples / batch), steps
    spec = FineTuneJobSpec.model_validate(manifest["spec"])
    assert harness.planned_steps(spec, rows, world_size=1) == steps
