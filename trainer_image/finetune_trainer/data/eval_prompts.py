"""The eval prompts of a causal-LM run with a prompt format: what the generation metrics complete.

For ``promptCompletion`` and ``chat`` records (:data:`finetune_operator.api.tasks.PROMPT_FORMATS`), one
row per eval record, in eval order: ``prompt_ids`` (the tokens a completion is generated after, as
``recipes.causal_lm.PROMPTS`` gives them: the prompt; the conversation before its last assistant turn
with the generation prompt), ``reference`` (the record's own completion, or that turn's content) and
``where`` (the record's ``file:line``). A prompt longer than ``spec.data.maxSeqLength`` keeps its last
``maxSeqLength`` tokens (those next to the completion), as the evaluation's rows are cut to that length.

The rows are part of the tokenized cache (``eval_prompts/``), so every rank has them whichever rank
read the records.
"""

from __future__ import annotations

import json
from typing import Any

import datasets
from finetune_operator.api.v1alpha1 import DataSpec
from transformers import PreTrainedTokenizerBase

# records first: it imports the format modules (chat among them), which import it back.
from .records import Record

# isort: split
from . import chat, prompt_completion

FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "reference": datasets.Value("large_string"),
        "where": datasets.Value("string"),
    }
)


def row(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> dict[str, Any]:
    """The eval prompt of one checked record (module docstring)."""
    prompt = chat.prompt if data.format == "chat" else prompt_completion.prompt
    ids, reference = prompt(record, tokenizer, data)
    return {"prompt_ids": ids[-data.max_seq_length :], "reference": reference, "where": record.where}


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
    return {name: [r[name] for r in rows] for name in FEATURES}
