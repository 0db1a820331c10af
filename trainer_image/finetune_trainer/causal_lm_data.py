"""Turn checked records into token sequences for causal-LM training (SFT and continual pre-training).

- ``promptCompletion``: prompt tokens, then completion tokens and EOS; the loss covers the completion
  only (``completionOnlyLoss``, the default) or everything.
- ``chat``: the conversation is rendered with the tokenizer's chat template (or the spec's override);
  the loss covers assistant turns only (each turn's text and its end-of-turn marker). Which tokens are
  assistant tokens is decided from character offsets of the rendered text, so the masking is exact
  even where a template joins turns without special tokens.
- ``text``: each record is a document followed by EOS. With packing, documents are cut into blocks of
  maxSeqLength; otherwise each is truncated to it.

Packing places several samples in one row, with ``position_ids`` that restart at every sample, and
no attention mask: transformers then detects the packed format from the positions and builds a
per-row block-diagonal causal mask (sdpa and eager attention), so no token attends across samples, and
the first token of each sample is never a target of the previous one. Packed rows of a batch stay
separate rows ([batch, longest row]), padded at the end with a segment of their own (positions
restarting at 0, labels ignored), so attention costs grow with each row's length, not the batch's.
Flash-attention kernels detect packed samples only in a single row (transformers' varlen path needs
batch size 1): for them the collator flattens the batch into one padding-free row instead. Without
packing, batches are right-padded. Either way training must run without a KV cache: with one,
transformers skips the packed-sequence mask and samples would attend to each other.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from finetune_operator.api.v1alpha1 import DataSpec
from transformers import PreTrainedTokenizerBase

from .records import DataError, Record

IGNORE = -100


@dataclass
class Example:
    """One training row: token ids, labels (IGNORE where no loss), and restart positions if packed."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatTemplateError(DataError):
    """The chat template renders a conversation in a way assistant turns cannot be located in."""


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def prompt_completion_example(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> Example:
    prompt = tokenizer(record.data[data.columns.prompt], add_special_tokens=True)["input_ids"]
    completion = tokenizer(record.data[data.columns.completion], add_special_tokens=False)["input_ids"]
    completion = completion + _eos(tokenizer)
    ids = (prompt + completion)[: data.max_seq_length]
    prompt_labels = [IGNORE] * len(prompt) if data.completion_only_loss else list(prompt)
    labels = (prompt_labels + completion)[: data.max_seq_length]
    return Example(ids, labels)


def chat_messages(record: Record, data: DataSpec) -> list[dict[str, str]]:
    messages = [{"role": m["role"], "content": m["content"]} for m in record.data[data.columns.messages]]
    if data.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": data.system_prompt})
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert isinstance(text, str)
    return text


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns in it."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        end = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise ChatTemplateError(
                ["the chat template does not render conversations incrementally; cannot locate assistant turns"]
            )
        spans.append((len(start), len(end)))
    return full, spans


def chat_example(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> Example:
    messages = chat_messages(record, data)
    text, spans = assistant_spans(tokenizer, messages)
    if not tokenizer.is_fast:
        raise ChatTemplateError([f"{record.where}: chat data needs a fast tokenizer (character offsets)"])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    if data.completion_only_loss:
        labels = [
            token if any(s <= begin < e for s, e in spans) else IGNORE
            for token, (begin, _end) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
    else:
        labels = list(ids)
    return Example(ids[: data.max_seq_length], labels[: data.max_seq_length])


def text_tokens(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[int]:
    ids: list[int] = tokenizer(record.data[data.columns.text], add_special_tokens=True)["input_ids"]
    return ids + _eos(tokenizer)


def build_examples(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[Example]:
    """Tokenize records in the spec's format (unpacked)."""
    if data.format == "promptCompletion":
        return [prompt_completion_example(r, tokenizer, data) for r in records]
    if data.format == "chat":
        return [chat_example(r, tokenizer, data) for r in records]
    if data.format == "text":
        out = []
        for r in records:
            ids = text_tokens(r, tokenizer, data)[: data.max_seq_length]
            out.append(Example(ids, list(ids)))
        return out
    raise ValueError(f"format {data.format} is not a causal-LM format")


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Fill rows of up to max_length tokens with whole examples, in order; positions restart per example."""
    rows: list[Example] = []
    current = Example([], [], [])
    for ex in examples:
        if current.input_ids and len(current) + len(ex) > max_length:
            rows.append(current)
            current = Example([], [], [])
        current.input_ids += ex.input_ids
        current.labels += ex.labels
        assert current.position_ids is not None
        current.position_ids += list(range(len(ex)))
    if current.input_ids:
        rows.append(current)
    return rows


def pack_documents(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[Example]:
    """Continual pre-training: documents one after another, cut into blocks of maxSeqLength."""
    block = data.max_seq_length
    rows: list[Example] = []
    ids: list[int] = []
    positions: list[int] = []
    for record in records:
        doc = text_tokens(record, tokenizer, data)
        while doc:
            take = doc[: block - len(ids)]
            doc = doc[len(take) :]
            ids += take
            positions += range(len(take))
            if len(ids) == block:
                rows.append(Example(ids, list(ids), positions))
                ids, positions = [], []
    if ids:
        rows.append(Example(ids, list(ids), positions))
    return rows


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random fraction of the records for evaluation (at least one, and at least one
    left to train on: a DataError otherwise)."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        where = records[0].file if records else "the training data"
        raise DataError(
            [
                f"{where}: spec.data.evalSplit {fraction} holds out {n_eval} of {len(records)} record(s), "
                "leaving nothing to train on"
            ]
        )
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


class ExampleDataset(torch.utils.data.Dataset[dict[str, list[int]]]):
    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ex = self.examples[index]
        item = {"input_ids": ex.input_ids, "labels": ex.labels}
        if ex.position_ids is not None:
            item["position_ids"] = ex.position_ids
        return item


# Attention implementations whose masks transformers builds per row from restarting position_ids
# (masking_utils.find_packed_sequence_indices); any other kernel gets one flattened row.
PER_ROW_PACKED_ATTENTION = frozenset({"sdpa", "eager"})


class CausalLMCollator:
    """Pads unpacked rows; batches packed rows (those with position_ids) as separate padded rows, or
    flattens them into one padding-free row where the attention kernel needs that (``flatten_packed``).

    Counts the real (non-padding) tokens and the rows it hands out, for throughput reporting.
    """

    def __init__(self, pad_token_id: int, *, flatten_packed: bool = False):
        self.pad_token_id = pad_token_id
        self.flatten_packed = flatten_packed
        self.tokens = 0
        self.samples = 0

    @classmethod
    def for_attention(cls, pad_token_id: int, attention: str | None) -> CausalLMCollator:
        """The collator for a model whose resolved attention implementation is ``attention``."""
        return cls(pad_token_id, flatten_packed=(attention or "eager") not in PER_ROW_PACKED_ATTENTION)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.samples += len(features)
        if all("position_ids" in f for f in features):
            return self._packed(features)
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        self.tokens += int(mask.sum())
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def _packed(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows: list[tuple[list[int], list[int], list[int]]] = []
        for f in features:
            # The first token of a sample is never the target of the previous sample's last token.
            labels = [IGNORE if p == 0 else label for label, p in zip(f["labels"], f["position_ids"], strict=True)]
            rows.append((list(f["input_ids"]), labels, list(f["position_ids"])))
            self.tokens += len(f["input_ids"])
        if self.flatten_packed:
            rows = [
                (
                    [t for ids, _, _ in rows for t in ids],
                    [t for _, labels, _ in rows for t in labels],
                    [p for _, _, positions in rows for p in positions],
                )
            ]
        width = max(len(ids) for ids, _, _ in rows)
        for ids, labels, positions in rows:
            pad = width - len(ids)
            # Padding is a segment of its own (positions restart), so no real token attends to it.
            ids += [self.pad_token_id] * pad
            labels += [IGNORE] * pad
            positions += range(pad)
        return {
            "input_ids": torch.tensor([r[0] for r in rows]),
            "labels": torch.tensor([r[1] for r in rows]),
            "position_ids": torch.tensor([r[2] for r in rows]),
            # With a KV cache, transformers skips the packed-sequence mask: samples would see each other.
            "use_cache": False,
        }
