"""The verifiable rewards of online RL (finetune_trainer.rewards), as spec.task.rl.rewards[] builds them,
and the pattern subset that finetune validate, the API server and the trainer read alike."""

from __future__ import annotations

import re

import pytest
from finetune_operator.api.v1alpha1 import REWARD_PATTERN_GRAMMAR, RewardSpec
from finetune_trainer.rewards import compile_pattern, completion_text, same_tokenizer, verifiable, verifiable_rewards

EOS = 0


def score(spec: dict[str, object], completions: list[object], ids: list[list[int]], refs: list[str]) -> list[float]:
    reward = verifiable(RewardSpec.model_validate(spec), eos_token_ids=[EOS])
    return reward(prompts=["p"] * len(completions), completions=completions, completion_ids=ids, reference=refs)


def test_exact_match_and_contains_compare_with_the_reference() -> None:
    completions = [" the apple is red\n", "the apple is red, sweet", "The apple is red"]
    ids = [[1, 2]] * 3
    refs = [" the apple is red"] * 3
    assert score({"type": "exactMatch"}, completions, ids, refs) == [1.0, 0.0, 0.0]
    assert score({"type": "contains"}, completions, ids, refs) == [1.0, 1.0, 0.0]  # case-sensitive


def test_chat_completions_are_scored_by_their_content() -> None:
    chat = [[{"role": "assistant", "content": "the plum is purple"}]]
    assert completion_text(chat[0]) == "the plum is purple"
    assert score({"type": "contains"}, chat, [[5]], ["purple"]) == [1.0]


def test_json_valid_wants_an_object_or_an_array() -> None:
    completions = [' {"a": 1} ', "[1, 2]", "5", '"text"', "{bad", ""]
    assert score({"type": "jsonValid"}, completions, [[1]] * 6, [""] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_length_counts_generated_tokens_without_the_end_of_sequence() -> None:
    ids = [[1, 2, 3, EOS], [1, 2, 3, 4, 5], [EOS], [1]]
    texts = ["x"] * len(ids)
    assert score({"type": "length", "maxTokens": 3}, texts, ids, [""] * 4) == [1.0, 0.0, 1.0, 1.0]
    assert score({"type": "length", "minTokens": 1, "maxTokens": 3}, texts, ids, [""] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert score({"type": "length", "minTokens": 4}, texts, ids, [""] * 4) == [0.0, 1.0, 0.0, 0.0]


def test_regex_searches_the_completion_with_re2_semantics() -> None:
    spec = {"type": "regex", "pattern": "^ is [a-z]+$"}
    completions = [" is red", " is red\n", "it is red", " is Red"]
    # RE2's $ is the end of the text: Python's alone would also match before the final newline.
    assert score(spec, completions, [[1]] * 4, [""] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert compile_pattern(r"a\$|[$]b$").pattern == r"a\$|[$]b\Z"
    # \d and \w are ASCII, as in RE2.
    assert compile_pattern(r"^\d+$").search("\u0663") is None


@pytest.mark.parametrize(
    "pattern",
    [r"red|green", r"^\d+$", r"[a-zA-Z0-9_\-]+", r"x\.y", r"[^\n]+", r"answer: \w+", r"\(\d\)", r'"ok"'],
)
def test_patterns_of_the_subset_compile_alike(pattern: str) -> None:
    assert re.fullmatch(REWARD_PATTERN_GRAMMAR, pattern)
    compile_pattern(pattern)


@pytest.mark.parametrize(
    "pattern",
    # A group, a back-reference, counted repetition, \s, lazy and nested quantifiers, a reversed range,
    # an unclosed class, a dangling escape, an empty alternative.
    [r"(a)", r"(a)\1", r"a{2,3}", r"\s", r"a*?", r"a**", r"[z-a]", r"[ab", "a\\", r"a||b", r"a$b"],
)
def test_patterns_outside_the_subset_are_refused(pattern: str) -> None:
    assert re.fullmatch(REWARD_PATTERN_GRAMMAR, pattern) is None


def test_a_repeated_type_gets_numbered_names() -> None:
    specs = [RewardSpec(type="contains"), RewardSpec(type="regex", pattern="a"), RewardSpec(type="regex", pattern="b")]
    assert [f.__name__ for f in verifiable_rewards(specs)] == ["contains", "regex_1", "regex_2"]


def test_the_reward_models_tokenizer_must_be_the_policys() -> None:
    import tiny

    policy = tiny.build_tokenizer()
    same = tiny.build_tokenizer()
    same.chat_template = None  # a template of its own does not matter: trl renders with the policy's
    other = tiny.build_tokenizer()
    other.add_tokens(["<extra>"])
    assert same_tokenizer(policy, same)
    assert not same_tokenizer(policy, other)
