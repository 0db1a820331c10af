"""``chat`` records: a conversation, a list of messages with a role and content.

Tokens: the conversation is rendered with the tokenizer's chat template (or the spec's override);
the loss covers assistant turns only (each turn's text and its end-of-turn marker). Which tokens are
assistant tokens is decided from character offsets of the rendered text, so the masking is exact
even where a template joins turns without special tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator.api.v1alpha1 import ColumnMapping, DataSpec
from transformers import PreTrainedTokenizerBase

from .examples import IGNORE, Example
from .records import DataError, Record

COLUMNS: tuple[str, ...] = ("messages",)
ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(DataError):
    """The chat template renders a conversation in a way assistant turns cannot be located in."""


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None."""
    messages = record.data.get(columns.messages)
    if not isinstance(messages, list) or not messages:
        return f"column '{columns.messages}' must be a non-empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{columns.messages}[{i}] must be an object with role and content"
        role = message.get("role")
        if role not in ROLES:
            return f"{columns.messages}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"
        if not isinstance(message.get("content"), str):
            return f"{columns.messages}[{i}].content must be a string"
        if role == "system" and i != 0:
            return f"{columns.messages}[{i}]: a system message must come first"
    if not any(m["role"] == "assistant" for m in messages):
        return f"column '{columns.messages}' has no assistant message to learn from"
    return None


def chat_messages(record: Record, data: DataSpec) -> list[dict[str, str]]:
    """The record's messages (role and content only), with the spec's system prompt first if it has none."""
    return _messages(record.data[data.columns.messages], data)


def _messages(conversation: list[dict[str, Any]], data: DataSpec) -> list[dict[str, str]]:
    messages = [{"role": m["role"], "content": m["content"]} for m in conversation]
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


def require_fast(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a tokenizer without character offsets (a slow one), naming the first chat record."""
    if not tokenizer.is_fast:
        raise ChatTemplateError([f"{where}: chat data needs a fast tokenizer (character offsets)"])


def tokenize(
    columns: Mapping[str, Sequence[Any]], tokenizer: PreTrainedTokenizerBase, data: DataSpec
) -> dict[str, list[list[int]]]:
    """A batch of conversations (``columns["messages"]``) as whole rows (not cut to maxSeqLength):
    each rendered with the chat template, its tokens, and labels on the assistant turns (everything
    without ``completionOnlyLoss``). Needs a fast tokenizer (:func:`require_fast`)."""
    rendered = [assistant_spans(tokenizer, _messages(conversation, data)) for conversation in columns["messages"]]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    all_ids: list[list[int]] = encoded["input_ids"]
    all_labels = []
    for (_text, spans), ids, offsets in zip(rendered, all_ids, encoded["offset_mapping"], strict=True):
        if data.prompt_loss_masked:
            labels = [
                token if any(s <= begin < e for s, e in spans) else IGNORE
                for token, (begin, _end) in zip(ids, offsets, strict=True)
            ]
        else:
            labels = list(ids)
        all_labels.append(labels)
    return {"input_ids": all_ids, "labels": all_labels}


def example(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> Example:
    """The conversation's training row (cut to maxSeqLength)."""
    require_fast(tokenizer, record.where)
    row = tokenize({"messages": [record.data[data.columns.messages]]}, tokenizer, data)
    return Example(row["input_ids"][0][: data.max_seq_length], row["labels"][0][: data.max_seq_length])


def prompt(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> tuple[list[int], str]:
    """The conversation up to its last assistant turn, rendered with the generation prompt as in
    training (the tokens the reply is generated after), and that turn's content (the reference)."""
    messages = chat_messages(record, data)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids: list[int] = tokenizer(_render(tokenizer, messages[:last], generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    return ids, messages[last]["content"]
