"""Online RL's rows (``spec.task.type: rl``): a prompt to sample completions after, and a reference answer.

An RL record is one of the formats with a prompt: ``promptCompletion`` (the prompt; its completion is
the reference answer the ``exactMatch`` and ``contains`` rewards compare with) or ``chat`` (the
conversation up to its last assistant turn, with the spec's system prompt first as in training; that
turn's content is the reference). A row holds what trl's GRPO and RLOO trainers read: ``prompt`` (text,
or for chat the messages, which trl renders with the tokenizer's chat template and the generation
prompt), ``reference`` and ``where`` (the record's ``file:line``, so that rollouts name their record);
``length`` is the prompt's token count as the policy sees it (its statistics are the preflight's).

A prompt is never cut: one longer than ``spec.data.maxSeqLength`` tokens is a data error naming the
record (trl would generate after the whole of it).
"""

from __future__ import annotations

import json
from typing import Any

import datasets
from finetune_operator.api.v1alpha1 import DataSpec
from transformers import PreTrainedTokenizerBase

from . import chat, prompt_completion
from .records import Record

_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


def features(fmt: str) -> datasets.Features:
    """The columns of the rows of a ``promptCompletion`` or ``chat`` RL run."""
    prompt = _MESSAGES if fmt == "chat" else datasets.Value("string")
    return datasets.Features(
        {
            "prompt": prompt,
            "reference": datasets.Value("string"),
            "where": datasets.Value("string"),
            "length": datasets.Value("int64"),
            "problem": datasets.Value("string"),
        }
    )


def row(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> dict[str, Any]:
    """The RL row of one checked record (module docstring); ``problem`` says why it cannot be used (or None)."""
    if data.format == "chat":
        ids, reference = chat.prompt(record, tokenizer, data)
        messages = chat.chat_messages(record, data)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt: Any = messages[:last]
    else:
        ids, reference = prompt_completion.prompt(record, tokenizer, data)
        prompt = record.data[data.columns.prompt]
    problem = None
    if len(ids) > data.max_seq_length:
        problem = (
            f"{record.where}: the prompt has {len(ids)} tokens, more than spec.data.maxSeqLength "
            f"{data.max_seq_length} (RL prompts are not cut)"
        )
    return {"prompt": prompt, "reference": reference, "where": record.where, "length": len(ids), "problem": problem}


def batch(
    texts: list[str],
    files: list[str],
    lines: list[int],
    units: list[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    data: DataSpec,
) -> dict[str, list[Any]]:
    """The rows of a batch of checked records stored as JSON (with their file, line and unit)."""
    rows = [
        row(Record(json.loads(text), file, line, unit), tokenizer, data)
        for text, file, line, unit in zip(texts, files, lines, units, strict=True)
    ]
    return {name: [r[name] for r in rows] for name in ("prompt", "reference", "where", "length", "problem")}
