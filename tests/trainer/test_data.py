"""Data: every bad record reported as file:line before training; exact loss masks; packing isolation."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from finetune_operator.api.trainer_config import EXIT_INVALID_DATA
from finetune_operator.api.v1alpha1 import DataSource, DataSpec
from finetune_trainer.data import chat
from finetune_trainer.data.collate import CausalLMCollator
from finetune_trainer.data.examples import IGNORE, build_examples
from finetune_trainer.data.packing import pack, pack_documents
from finetune_trainer.data.records import DataError, Record, load_checked
from runs import RunResult
from tiny import chat_rows, job_manifest, prompt_completion_rows, text_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_bad_records_are_reported_with_file_and_line_before_training(
    tmp_path: Path, tiny_model: Path, finetune_run: Callable[..., RunResult]
) -> None:
    rows = [json.dumps(r) for r in prompt_completion_rows(6)]
    rows[2] = '{"prompt": "what color is the apple?", "completion": '  # line 3: broken JSON
    rows[4] = json.dumps({"prompt": "what color is the pear?"})  # line 5: no completion
    rows.append(json.dumps({"prompt": "", "completion": "x"}))  # line 7: empty prompt
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    result = finetune_run(job_manifest("bad-data", tiny_model, train))
    assert result.returncode == EXIT_INVALID_DATA, result.output[-3000:]
    assert f"{train}:3: invalid JSON" in result.output
    assert f"{train}:5: missing column 'completion'" in result.output
    assert f"{train}:7: column 'prompt' must be a non-empty string" in result.output
    # Nothing was trained: no progress was ever logged.
    assert not (result.workdir / "metrics.jsonl").exists()


def test_every_format_is_checked(tmp_path: Path) -> None:
    chat = [
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    data = DataSpec(train=DataSource(uri=str(path)), format="chat")
    with pytest.raises(DataError) as info:
        load_checked(data.train, "chat", data.columns)
    assert info.value.problems == [
        f"{path}:1: column 'messages' has no assistant message to learn from",
        f"{path}:2: messages[1].role must be one of system, user, assistant, tool, got 'robot'",
        f"{path}:3: messages[1]: a system message must come first",
    ]
    csv_path = tmp_path / "text.csv"
    csv_path.write_text('text,extra\n"ok",1\n,2\n"a","b","c"\n')
    with pytest.raises(DataError) as info:
        load_checked(DataSource(uri=str(csv_path)), "text", data.columns)
    assert info.value.problems == [
        f"{csv_path}:4: more fields than the header has",
        f"{csv_path}:3: column 'text' must be a non-empty string",
    ]


def test_relative_paths_and_directories(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", text_rows(3))
    write_jsonl(tmp_path / "data" / "b.jsonl", text_rows(2, seed=1))
    records = load_checked(
        DataSource(uri="data"), "text", DataSpec(train=DataSource(uri="x")).columns, base_dir=str(tmp_path)
    )
    assert [(Path(r.file).name, r.line) for r in records] == [
        ("a.jsonl", 1),
        ("a.jsonl", 2),
        ("a.jsonl", 3),
        ("b.jsonl", 1),
        ("b.jsonl", 2),
    ]


def test_assistant_only_masking_token_by_token(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = DataSpec(train=DataSource(uri="x"), format="chat", maxSeqLength=512)
    record = Record(chat_rows(1, seed=3)[0], "chat.jsonl", 1)
    example = chat.example(record, tokenizer, data)
    messages = record.data["messages"]
    text, spans = chat.assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert example.input_ids == encoded["input_ids"]
    assistant_text = "".join(text[s:e] for s, e in spans)
    assert assistant_text == (f"{messages[2]['content']}<|im_end|>\n{messages[4]['content']}<|im_end|>\n")
    for token, label, (begin, end) in zip(example.input_ids, example.labels, encoded["offset_mapping"], strict=True):
        inside = any(s <= begin < e for s, e in spans)
        assert label == (token if inside else IGNORE), (tokenizer.decode([token]), begin, end)
    labelled = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert labelled == assistant_text
    # The system and user turns, and the assistant headers, carry no loss.
    prompt_part = tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == IGNORE]
    )
    assert "answer about fruit" in prompt_part and "<|im_start|>assistant" in prompt_part
    assert messages[2]["content"] not in prompt_part


def test_completion_only_loss_masks_the_prompt(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    row = {"prompt": "what color is the lemon?", "completion": " the lemon is yellow"}
    data = DataSpec(train=DataSource(uri="x"))
    [ex] = build_examples([Record(row, "f", 1)], tokenizer, data)
    prompt_len = len(tokenizer(row["prompt"])["input_ids"])
    assert ex.labels[:prompt_len] == [IGNORE] * prompt_len
    assert tokenizer.decode(ex.labels[prompt_len:]) == row["completion"] + tokenizer.eos_token
    data_all = DataSpec(train=DataSource(uri="x"), completionOnlyLoss=False)
    [ex_all] = build_examples([Record(row, "f", 1)], tokenizer, data_all)
    assert ex_all.labels == ex_all.input_ids


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
def test_packed_samples_do_not_attend_to_each_other(tiny_model: Path, flatten: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    data = DataSpec(train=DataSource(uri="x"), completionOnlyLoss=False, maxSeqLength=64)
    records = [Record(r, "f", i) for i, r in enumerate(prompt_completion_rows(12, seed=5))]
    examples = build_examples(records, tokenizer, data)
    rows = pack(examples, 64)
    assert len(rows) < len(examples)
    assert len({len(r) for r in rows}) > 1, "rows of different lengths, so some rows carry padding"
    batch = CausalLMCollator(tokenizer.pad_token_id, flatten_packed=flatten)(
        [{"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.position_ids} for r in rows]
    )
    assert "attention_mask" not in batch and batch["use_cache"] is False
    if flatten:  # one padding-free row (what flash-attention kernels need)
        assert batch["input_ids"].shape == (1, sum(len(r) for r in rows))
        placed = [(0, sum(len(r) for r in rows[:i]), r) for i, r in enumerate(rows)]
    else:  # one row per packed row, padded to the longest
        assert batch["input_ids"].shape == (len(rows), max(len(r) for r in rows))
        placed = [(i, 0, r) for i, r in enumerate(rows)]
    model.train()  # as in training, where a KV cache would silently disable the packed-sequence mask
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        seen = 0
        for index, start, row in placed:
            assert row.position_ids is not None
            starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row)]
            for begin, end in itertools.pairwise(starts):
                ids = row.input_ids[begin:end]
                alone = model(input_ids=torch.tensor([ids])).logits[0]
                # Every sample sees only itself: neither the samples before it nor the padding after.
                torch.testing.assert_close(logits[index, start + begin : start + end], alone, atol=1e-5, rtol=1e-5)
                # The first token of each sample is never the target of the previous sample's last token.
                assert batch["labels"][index, start + begin] == IGNORE
                assert batch["labels"][index, start + begin + 1 : start + end].tolist() == ids[1:]
                seen += 1
            if not flatten:  # padding: no loss, and a segment of its own (positions restart at 0)
                pad = batch["input_ids"].shape[1] - len(row)
                assert batch["labels"][index, len(row) :].tolist() == [IGNORE] * pad
                assert batch["position_ids"][index, len(row) :].tolist() == list(range(pad))
    assert seen == len(examples)


def test_collator_flattens_packed_rows_only_for_kernels_that_need_it() -> None:
    assert not CausalLMCollator.for_attention(0, "sdpa").flatten_packed
    assert not CausalLMCollator.for_attention(0, "eager").flatten_packed
    assert CausalLMCollator.for_attention(0, "flash_attention_2").flatten_packed


def test_text_is_cut_into_blocks(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = DataSpec(train=DataSource(uri="x"), format="text", maxSeqLength=32, packing=True)
    records = [Record(r, "f", i) for i, r in enumerate(text_rows(20))]
    rows = pack_documents(records, tokenizer, data)
    total = sum(len(tokenizer(r.data["text"])["input_ids"]) + 1 for r in records)
    assert sum(len(r) for r in rows) == total
    assert all(len(r) == 32 for r in rows[:-1]) and 0 < len(rows[-1]) <= 32
    assert all(r.position_ids is not None and r.position_ids[0] == 0 for r in rows)


def test_jsonl_lines_end_only_at_newlines(tmp_path: Path) -> None:
    """U+2028, U+2029, U+0085, form feeds, vertical tabs and \\x1c-\\x1e are legal inside JSON strings and
    are line breaks to str.splitlines(): the line numbers must count only \\n (and \\r\\n)."""
    breakers = "\u2028\u2029\u0085\x0c\x0b\x1c\x1d\x1e"
    # Written raw, not escaped (json.dumps would escape the control characters).
    rows = ['{"prompt": "p%s%d", "completion": "c"}' % (breakers, i) for i in range(3)]  # noqa: UP031
    rows.insert(2, json.dumps({"prompt": "no completion"}))
    path = tmp_path / "train.jsonl"
    path.write_bytes(("\r\n".join(rows[:2]) + "\n" + "\n".join(rows[2:]) + "\n").encode())
    with pytest.raises(DataError) as info:
        load_checked(DataSource(uri=str(path)), "promptCompletion", DataSpec(train=DataSource(uri="x")).columns)
    assert info.value.problems == [f"{path}:3: missing column 'completion'"]
    path.write_bytes(path.read_bytes().replace(b'{"prompt": "no completion"}', b'{"prompt": "x", "completion": "y"}'))
    records = load_checked(DataSource(uri=str(path)), "promptCompletion", DataSpec(train=DataSource(uri="x")).columns)
    assert [r.line for r in records] == [1, 2, 3, 4]
    assert records[3].data["prompt"] == f"p{breakers}2"


def test_csv_records_are_placed_at_the_line_they_start(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"two\nlines",a\n,b\n')
    with pytest.raises(DataError) as info:
        load_checked(DataSource(uri=str(path)), "text", DataSpec(train=DataSource(uri="x")).columns)
    assert info.value.problems == [f"{path}:4: column 'text' must be a non-empty string"]


def test_json_arrays_and_parquet_rows_are_placed_exactly(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = DataSpec(train=DataSource(uri="x")).columns
    array = tmp_path / "train.json"
    array.write_text('[\n  {"text": "a"},\n  {"text": ""}, "oops",\n\n  {"text": "\u2028x"}, {"other": 1}\n]\n')
    with pytest.raises(DataError) as info:
        load_checked(DataSource(uri=str(array)), "text", columns)
    assert info.value.problems == [
        f"{array}:3: expected a JSON object, got str",
        f"{array}:3: column 'text' must be a non-empty string",
        f"{array}:5: missing column 'text'",
    ]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"text": "a"}, {"text": 3}]}))
    with pytest.raises(DataError) as info:
        load_checked(DataSource(uri=str(wrapped)), "text", columns)
    assert info.value.problems == [f"{wrapped}:record 2: column 'text' must be a non-empty string"]
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "", "c"]}), parquet)
    with pytest.raises(DataError) as info:
        load_checked(DataSource(uri=str(parquet)), "text", columns)
    assert info.value.problems == [f"{parquet}:row 2: column 'text' must be a non-empty string"]
