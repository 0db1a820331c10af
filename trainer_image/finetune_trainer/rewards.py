"""The reward functions of online RL (``spec.task.rl``): the verifiable rewards and the reward model.

Each is a callable as trl's GRPO and RLOO trainers call a reward function: keyword arguments
``prompts``, ``completions`` (text, or for chat prompts a one-message list ``[{"role": "assistant",
"content": ...}]``), ``completion_ids`` (the generated token ids), and the dataset's other columns,
one value per completion (here ``reference``: the record's reference answer, and ``where``); it returns
one float per completion.

The verifiable rewards (``spec.task.rl.rewards[]``, :func:`verifiable`), each 1 or 0 (its ``weight`` is
trl's ``reward_weights``, applied when the rewards are summed):

* ``exactMatch`` — the completion, stripped of surrounding whitespace, equals the stripped reference;
* ``contains`` — the completion contains the stripped reference (case-sensitive);
* ``regex`` — ``pattern`` matches somewhere in the completion (:func:`compile_pattern`: the API's subset
  of regular expressions, read as RE2 reads it);
* ``jsonValid`` — the stripped completion parses as a JSON object or array;
* ``length`` — the completion has between ``minTokens`` (default 0) and ``maxTokens`` (default no
  limit) tokens, counted as generated (its end-of-sequence token not counted).

The reward model (``spec.task.rl.rewardModel``, loaded by the recipe) is a sequence-classification model
with one output, loaded with transformers' ``AutoModelForSequenceClassification``; trl scores prompt +
completion with it (the chat template applied to chat prompts) and adds its score with weight 1. It must
use the policy's tokenizer (:func:`same_tokenizer`): it reads text the policy's tokenizer rendered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from finetune_operator.api.v1alpha1 import RewardSpec

#: A reward function as trl calls it.
RewardFunction = Callable[..., list[float]]

_ESCAPED = r"\\."
_CLASS = r"\[(?:\\.|[^\]])*\]"


def completion_text(completion: Any) -> str:
    """The generated text of a completion: the string itself, or the content of a chat completion's
    assistant message(s)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A ``regex`` reward's pattern (already checked against the API's grammar,
    ``REWARD_PATTERN_GRAMMAR``), compiled to match as RE2 does: ``\\d`` and ``\\w`` ASCII, and an unescaped
    ``$`` outside a class the end of the text (Python's ``$`` also matches before a final newline)."""
    out = []
    for token in re.finditer(rf"{_ESCAPED}|{_CLASS}|.", pattern, flags=re.DOTALL):
        text = token.group(0)
        out.append(r"\Z" if text == "$" else text)
    return re.compile("".join(out), flags=re.ASCII)


def _exact_match(completion: str, reference: str, ids: Sequence[int]) -> bool:
    return completion.strip() == reference.strip()


def _contains(completion: str, reference: str, ids: Sequence[int]) -> bool:
    return reference.strip() in completion


def _json_valid(completion: str, reference: str, ids: Sequence[int]) -> bool:
    try:
        value = json.loads(completion.strip())
    except ValueError:
        return False
    return isinstance(value, dict | list)


def verifiable(spec: RewardSpec, *, eos_token_ids: Sequence[int] = ()) -> RewardFunction:
    """The reward function of one ``spec.task.rl.rewards[]`` entry (module docstring), unweighted.
    ``eos_token_ids``: the tokens that end a completion, not counted by ``length``."""
    test: Callable[[str, str, Sequence[int]], bool]
    if spec.type == "exactMatch":
        test = _exact_match
    elif spec.type == "contains":
        test = _contains
    elif spec.type == "jsonValid":
        test = _json_valid
    elif spec.type == "regex":
        assert spec.pattern is not None  # the API requires it
        compiled = compile_pattern(spec.pattern)

        def test(completion: str, reference: str, ids: Sequence[int]) -> bool:
            return compiled.search(completion) is not None

    else:
        low = spec.min_tokens or 0
        high = spec.max_tokens
        ends = frozenset(eos_token_ids)

        def test(completion: str, reference: str, ids: Sequence[int]) -> bool:
            n = len(ids) - (1 if ids and ids[-1] in ends else 0)
            return low <= n and (high is None or n <= high)

    def reward(
        *,
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        reference: Sequence[str] | None = None,
        **_: Any,
    ) -> list[float]:
        refs = reference if reference is not None else [""] * len(completions)
        return [
            float(test(completion_text(c), r, ids)) for c, r, ids in zip(completions, refs, completion_ids, strict=True)
        ]

    reward.__name__ = spec.type
    return reward


def verifiable_rewards(specs: Sequence[RewardSpec], *, eos_token_ids: Sequence[int] = ()) -> list[RewardFunction]:
    """The reward functions of ``spec.task.rl.rewards``, named ``<type>`` (``<type>_<i>`` when a type
    repeats: trl reports each function's mean as ``rewards/<name>/mean``)."""
    functions = []
    counts = {s.type: sum(1 for t in specs if t.type == s.type) for s in specs}
    for i, spec in enumerate(specs):
        function = verifiable(spec, eos_token_ids=eos_token_ids)
        function.__name__ = spec.type if counts[spec.type] == 1 else f"{spec.type}_{i}"
        functions.append(function)
    return functions


def same_tokenizer(policy: Any, reward: Any) -> bool:
    """Whether a reward model's tokenizer splits text as the policy's does: the same tokenization model
    (vocabulary and merges of a fast tokenizer; the vocabulary of a slow one), the same added tokens
    and the same end-of-sequence token. Chat templates and padding may differ (trl renders with the
    policy's and pads as the reward model's config says)."""

    def essentials(tokenizer: Any) -> tuple[Any, ...]:
        if tokenizer.is_fast:
            model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        else:
            model = sorted(tokenizer.get_vocab().items())
        added = sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items())
        return json.dumps(model, sort_keys=True), added, tokenizer.eos_token_id

    return essentials(policy) == essentials(reward)
