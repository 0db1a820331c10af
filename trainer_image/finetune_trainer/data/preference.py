"""``preference`` records: a prompt, a chosen and a rejected response (reward models, DPO).

A record is plain text or a conversation:

- **plain text**: ``prompt``, ``chosen`` and ``rejected`` are non-empty strings; a response is the
  text that follows the prompt (the tokenizer's EOS is appended to it);
- **chat**: ``prompt`` is a list of ``{role, content}`` messages (system first if any, not ending with
  an assistant turn) and each response is a list of assistant messages, or a string (one assistant
  message). Both sides share the prompt; they are rendered with the chat template (the prompt with
  the generation prompt), as trl renders conversational preference data.

:func:`check` refuses, as ``file:line: reason`` before any model is loaded: a missing or empty side,
an empty prompt, a role other than system/user/assistant/tool in the prompt (or other than assistant
in a response), a text prompt with message responses, and a chosen response identical to the rejected
one (no preference to learn).

Tokens (:func:`tokenize`): ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``, where ``prompt_ids +
chosen_ids`` is the tokenized prompt followed by the chosen response, and the prompt part is where the
two tokenizations agree (a tokenizer may merge tokens across the boundary; the response then starts
where they part). These are the columns trl's DPO and reward trainers take, tokenized as they would:
a reward model scores ``prompt_ids + chosen_ids``; DPO's log-probabilities are over the response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator.api.v1alpha1 import ColumnMapping, DataSpec
from transformers import PreTrainedTokenizerBase

from .chat import ROLES
from .records import Record

COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")


def _messages_problem(value: list[Any], column: str, *, roles: tuple[str, ...]) -> str | None:
    if not value:
        return f"column '{column}' must not be an empty list"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"{column}[{i}] must be an object with role and content"
        role = message.get("role")
        if role not in roles:
            allowed = roles[0] if len(roles) == 1 else "one of " + ", ".join(roles)
            return f"{column}[{i}].role must be {allowed}, got {role!r}"
        content = message.get("content")
        if not (isinstance(content, str) and content.strip()):
            return f"{column}[{i}].content must be a non-empty string"
        if role == "system" and i != 0:
            return f"{column}[{i}]: a system message must come first"
    return None


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None."""
    data = record.data
    for column in (columns.prompt, columns.chosen, columns.rejected):
        if column not in data or data[column] is None:
            return f"missing column '{column}'"
    prompt = data[columns.prompt]
    if isinstance(prompt, str):
        if not prompt.strip():
            return f"column '{columns.prompt}' must not be empty"
        for column in (columns.chosen, columns.rejected):
            value = data[column]
            if isinstance(value, list):
                return (
                    f"column '{column}' is a list of messages but '{columns.prompt}' is text: a conversation's "
                    f"prompt is a list of messages too"
                )
            if not (isinstance(value, str) and value.strip()):
                return f"column '{column}' must be a non-empty string"
    elif isinstance(prompt, list):
        problem = _messages_problem(prompt, columns.prompt, roles=ROLES)
        if problem:
            return problem
        if prompt[-1]["role"] == "assistant":
            return f"column '{columns.prompt}' ends with an assistant message: the responses are the assistant's reply"
        for column in (columns.chosen, columns.rejected):
            value = data[column]
            if isinstance(value, list):
                problem = _messages_problem(value, column, roles=("assistant",))
                if problem:
                    return problem
            elif not (isinstance(value, str) and value.strip()):
                return f"column '{column}' must be a non-empty string or a list of assistant messages"
    else:
        return f"column '{columns.prompt}' must be a non-empty string or a list of messages"
    chosen, rejected = data[columns.chosen], data[columns.rejected]
    if _turns(chosen, prompt) == _turns(rejected, prompt):
        return f"columns '{columns.chosen}' and '{columns.rejected}' are identical: there is no preference to learn"
    return None


def _turns(response: str | list[dict[str, Any]], prompt: str | list[Any]) -> str | list[dict[str, str]]:
    """A response as compared and rendered: after a text prompt, its text; after a conversation, its
    messages (role and content only; a string is one assistant message)."""
    if not is_conversational(prompt):
        assert isinstance(response, str)
        return response
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return [{"role": m["role"], "content": m["content"]} for m in response]


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert isinstance(text, str)
    return text


def tokenize(
    columns: Mapping[str, Sequence[Any]], tokenizer: PreTrainedTokenizerBase, data: DataSpec
) -> dict[str, list[list[int]]]:
    """A batch of checked records' ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``, whole (not cut
    to maxSeqLength). ``data`` changes nothing here (the tokens are the records'); it is taken as every
    format's ``tokenize`` takes it."""
    del data
    end = tokenizer.eos_token or ""
    # (prompt, prompt + chosen, prompt + rejected) as text, and whether the tokenizer adds its special
    # tokens (plain text) or the chat template has written them (conversations).
    rendered: list[tuple[str, str, str]] = []
    special: list[bool] = []
    for prompt, chosen, rejected in zip(columns["prompt"], columns["chosen"], columns["rejected"], strict=True):
        if is_conversational(prompt):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
            replies = []
            for response in (chosen, rejected):
                turns = _turns(response, prompt)
                assert isinstance(turns, list)
                replies.append(_render(tokenizer, messages + turns, generation_prompt=False))
            rendered.append((_render(tokenizer, messages, generation_prompt=True), replies[0], replies[1]))
            special.append(False)
        else:
            chosen_text, rejected_text = (r if r.endswith(end) else r + end for r in (chosen, rejected))
            rendered.append((prompt, prompt + chosen_text, prompt + rejected_text))
            special.append(True)
    ids: list[tuple[list[int], list[int], list[int]]] = [([], [], [])] * len(rendered)
    for kind in (True, False):
        indices = [i for i, s in enumerate(special) if s is kind]
        if not indices:
            continue
        encoded = [
            tokenizer([rendered[i][part] for i in indices], add_special_tokens=kind)["input_ids"] for part in range(3)
        ]
        for n, i in enumerate(indices):
            ids[i] = (encoded[0][n], encoded[1][n], encoded[2][n])
    out: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for prompt_ids, with_chosen, with_rejected in ids:
        cut = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
        out["prompt_ids"].append(prompt_ids[:cut])
        out["chosen_ids"].append(with_chosen[cut:])
        out["rejected_ids"].append(with_rejected[cut:])
    return out
