"""The ``preference`` format: every bad record named by file and line, and tokens as trl makes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tiny
from finetune_operator.api.v1alpha1 import ColumnMapping, DataSource, DataSpec
from finetune_trainer.data import preference
from finetune_trainer.data.records import DataError, load_checked

USER = [{"role": "user", "content": "what color is the apple?"}]
GOOD_TEXT = {"prompt": "what color is the apple?", "chosen": " the apple is red", "rejected": " the apple is blue"}
GOOD_CHAT = {"prompt": USER, "chosen": [{"role": "assistant", "content": "red"}], "rejected": "blue"}

BAD: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "p", "chosen": "a"}, "missing column 'rejected'"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "column 'prompt' must not be empty"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "column 'chosen' must be a non-empty string"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "columns 'chosen' and 'rejected' are identical"),
    (
        {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
        "column 'chosen' is a list of messages but 'prompt' is text",
    ),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "column 'prompt' must not be an empty list"),
    (
        {"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"},
        "prompt[0].role must be one of system, user, assistant, tool, got 'robot'",
    ),
    (
        {"prompt": [*USER, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        "ends with an assistant message",
    ),
    (
        {"prompt": [*USER, {"role": "system", "content": "late"}], "chosen": "a", "rejected": "b"},
        "prompt[1]: a system message must come first",
    ),
    (
        {"prompt": USER, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        "chosen[0].role must be assistant, got 'user'",
    ),
    (
        {"prompt": USER, "chosen": "red", "rejected": [{"role": "assistant", "content": "red"}]},
        "are identical",
    ),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "column 'prompt' must be a non-empty string or a list of messages"),
]


@pytest.mark.parametrize(("row", "reason"), BAD, ids=[reason[:40] for _, reason in BAD])
def test_a_bad_record_is_named_by_file_and_line(tmp_path: Path, row: dict[str, Any], reason: str) -> None:
    path = tiny.write_jsonl(tmp_path / "prefs.jsonl", [GOOD_TEXT, GOOD_CHAT, row])
    with pytest.raises(DataError) as caught:
        load_checked(DataSource(uri=str(path)), "preference", ColumnMapping())
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:3: "), problem
    assert reason in problem, problem


def test_good_records_pass_in_both_shapes(tmp_path: Path) -> None:
    path = tiny.write_jsonl(tmp_path / "prefs.jsonl", [GOOD_TEXT, GOOD_CHAT])
    records = load_checked(DataSource(uri=str(path)), "preference", ColumnMapping())
    assert [r.line for r in records] == [1, 2]


def test_mapped_columns_are_read(tmp_path: Path) -> None:
    row = {"question": "what color is the apple?", "good": "red", "bad": "blue"}
    path = tiny.write_jsonl(tmp_path / "prefs.jsonl", [row])
    columns = ColumnMapping.model_validate({"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert len(load_checked(DataSource(uri=str(path)), "preference", columns)) == 1
    wrong = tiny.write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "good": "a", "bad": "a"}])
    with pytest.raises(DataError, match="columns 'good' and 'bad' are identical"):
        load_checked(DataSource(uri=str(wrong)), "preference", columns)


def _trl_tokens(tokenizer: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    """The columns trl's DPOTrainer tokenizes a preference example into (its own dataset preparation)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    example = dict(row)
    if isinstance(example["prompt"], list):
        example = {
            k: v if isinstance(v, list) or k == "prompt" else [{"role": "assistant", "content": v}]
            for k, v in example.items()
        }
    dataset = Dataset.from_list([{k: json.dumps(v) for k, v in example.items()}])
    dataset = dataset.map(lambda e: {k: json.loads(v) for k, v in e.items()})
    prepared = DPOTrainer._prepare_dataset(  # the trainer's own preparation, without building a trainer
        _Stub(tokenizer),
        dataset,
        tokenizer,
        DPOConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True, bf16=False),
        "train",
    )
    return {k: prepared[0][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


class _Stub:
    """What DPOTrainer._prepare_dataset reads of the trainer: its tokenizer."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer


@pytest.mark.parametrize("row", [GOOD_TEXT, GOOD_CHAT], ids=["text", "chat"])
def test_tokens_are_trls(row: dict[str, Any]) -> None:
    tokenizer = tiny.build_tokenizer()
    ours = preference.tokenize({k: [v] for k, v in row.items()}, tokenizer, DataSpec.model_validate(_data()))
    assert {k: v[0] for k, v in ours.items()} == _trl_tokens(tokenizer, row)


def test_a_batch_of_both_shapes_tokenizes_each_as_alone() -> None:
    tokenizer = tiny.build_tokenizer()
    data = DataSpec.model_validate(_data())
    both = preference.tokenize({k: [GOOD_TEXT[k], GOOD_CHAT[k]] for k in GOOD_TEXT}, tokenizer, data)
    for i, row in enumerate((GOOD_TEXT, GOOD_CHAT)):
        alone = preference.tokenize({k: [v] for k, v in row.items()}, tokenizer, data)
        assert {k: v[i] for k, v in both.items()} == {k: v[0] for k, v in alone.items()}


def _data() -> dict[str, Any]:
    return {"train": {"uri": "unused.jsonl"}, "format": "preference"}
