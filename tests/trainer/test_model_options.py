"""spec.model's options reach the model and tokenizer a run loads, through the recipe's loaders
(:mod:`finetune_trainer.modeling`): dtype, attention, chat template, revision, trustRemoteCode, and
spec.training.dropout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from finetune_operator.api.v1alpha1 import DataSpec, ModelSpec
from finetune_trainer import modeling
from finetune_trainer.data import chat
from finetune_trainer.data.examples import IGNORE
from finetune_trainer.data.records import Record
from finetune_trainer.distributed import World
from finetune_trainer.errors import ConfigError
from tiny import chat_rows
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase


def spec(uri: str | Path, **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"uri": str(uri), **fields})


def source(model: ModelSpec, tmp_path: Path) -> modeling.ModelSource:
    return modeling.resolve_source(model, base_dir=None, cache_dir=tmp_path / "cache", world=World.from_env())


def load(model: ModelSpec, tmp_path: Path, *, dropout: float | None = None) -> PreTrainedModel:
    """The model as the recipe loads it."""
    where = source(model, tmp_path)
    return modeling.load_causal_lm(
        where,
        model,
        dtype=modeling.model_dtype(model.dtype),
        overrides=modeling.dropout_overrides(where, model, dropout),
    )


def tokenizer_of(model: ModelSpec, tmp_path: Path) -> PreTrainedTokenizerBase:
    return modeling.load_tokenizer(source(model, tmp_path), model)


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved in bfloat16."""
    directory = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    return directory


# -- spec.model.dtype -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "saved_in", "loaded_in"),
    [
        pytest.param("auto", "bf16", torch.bfloat16, id="auto"),  # the checkpoint's own
        pytest.param("bf16", "fp32", torch.bfloat16, id="bf16"),
        pytest.param("fp16", "bf16", torch.float16, id="fp16"),
        pytest.param("fp32", "bf16", torch.float32, id="fp32"),
    ],
)
def test_dtype_is_the_loaded_weights_dtype(
    dtype: str, saved_in: str, loaded_in: torch.dtype, tiny_model: Path, tiny_bf16: Path, tmp_path: Path
) -> None:
    """Every parameter is loaded in spec.model.dtype, which differs from the checkpoint's in each case
    but `auto`, which keeps it."""
    checkpoint = tiny_bf16 if saved_in == "bf16" else tiny_model
    model = load(spec(checkpoint, dtype=dtype), tmp_path)
    assert {p.dtype for p in model.parameters()} == {loaded_in}


# -- spec.model.attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["auto", "eager", "sdpa"])
def test_attention_is_the_loaded_models_implementation(
    attention: str, tiny_model: Path, tiny_with_code: Path, tmp_path: Path
) -> None:
    """The attention implementation the model runs with: the one named, or with `auto` transformers'
    choice — sdpa where the model supports it (the tiny Llama), else eager (a model whose own code says
    it has no sdpa support; sdpa named for it is refused, naming spec.model.attention: exit 2)."""
    expected = {"auto": "sdpa", "eager": "eager", "sdpa": "sdpa"}[attention]
    assert load(spec(tiny_model, attention=attention), tmp_path).config._attn_implementation == expected
    without_sdpa = spec(tiny_with_code, attention=attention, trustRemoteCode=True)
    if attention == "sdpa":
        with pytest.raises(ConfigError, match=r"^spec\.model\.attention: sdpa: .*scaled_dot_product_attention"):
            load(without_sdpa, tmp_path)
    else:
        assert load(without_sdpa, tmp_path).config._attn_implementation == "eager"


# -- spec.model.trustRemoteCode -------------------------------------------------------------------------


def test_trust_remote_code_runs_the_models_own_code(tiny_with_code: Path, tmp_path: Path) -> None:
    """A model that needs its own code is refused by default, naming spec.model.trustRemoteCode (a config
    error, exit 2: retrying cannot help), and loaded with it under trustRemoteCode."""
    with pytest.raises(ConfigError, match=r"^spec\.model\.trustRemoteCode: .* needs its own code"):
        load(spec(tiny_with_code), tmp_path)
    model = load(spec(tiny_with_code, trustRemoteCode=True), tmp_path)
    assert type(model).__name__ == "FruitForCausalLM"
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__


# -- spec.model.revision --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face Hub cache holding the model `fruit/tiny` at two commits: `main`, and the branch
    `v2`, whose config and tokenizer config carry their own marks."""
    cache = tmp_path_factory.mktemp("hub-cache")
    repo = cache / "models--fruit--tiny"
    for ref, commit, max_length in (("main", "a" * 40, 100), ("v2", "b" * 40, 200)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(tiny_model, snapshot)
        config = json.loads((snapshot / "config.json").read_text())
        (snapshot / "config.json").write_text(json.dumps({**config, "fruit_snapshot": ref}))
        tokenizer_config = json.loads((snapshot / "tokenizer_config.json").read_text())
        tokenizer_config["model_max_length"] = max_length
        (snapshot / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return cache


@pytest.mark.parametrize(
    ("revision", "snapshot", "max_length"),
    [(None, "main", 100), ("v2", "v2", 200), ("b" * 40, "v2", 200)],
    ids=["default", "branch", "commit"],
)
def test_revision_selects_the_hub_commit(
    revision: str | None,
    snapshot: str,
    max_length: int,
    hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A Hub id is loaded at spec.model.revision (a branch or a commit): model and tokenizer come from
    that commit of the repository (read from the Hub cache, offline)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    model = spec("fruit/tiny", revision=revision)
    where = source(model, tmp_path)
    assert (where.path, where.is_local) == ("fruit/tiny", False)
    assert load(model, tmp_path).config.fruit_snapshot == snapshot
    assert tokenizer_of(model, tmp_path).model_max_length == max_length


def test_revision_of_a_directory_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    """A relative path that reads like a Hub id but is a directory has no revision to check out: the
    trainer refuses it (admission refuses a path or URI that cannot be a Hub id: revision-of-a-path)."""
    (tmp_path / "fruit").mkdir()
    shutil.copytree(tiny_model, tmp_path / "fruit" / "tiny")
    with pytest.raises(modeling.ModelSourceError, match=r"spec\.model\.revision is only used for Hub ids"):
        modeling.resolve_source(
            spec("fruit/tiny", revision="v2"), base_dir=str(tmp_path), cache_dir=tmp_path, world=World.from_env()
        )
    local = modeling.resolve_source(
        spec("fruit/tiny"), base_dir=str(tmp_path), cache_dir=tmp_path, world=World.from_env()
    )
    assert (local.path, local.is_local) == (str(tmp_path / "fruit" / "tiny"), True)


# -- spec.model.chatTemplate ----------------------------------------------------------------------------

#: A template unlike the tiny tokenizer's own (ChatML).
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>\n{% endif %}"
)


def test_chat_template_renders_chat_records(tiny_model: Path, tmp_path: Path) -> None:
    """spec.model.chatTemplate replaces the tokenizer's template: chat records are rendered with it, and
    the loss covers the assistant turns as it places them."""
    data = DataSpec.model_validate({"train": {"uri": "x"}, "format": "chat", "maxSeqLength": 512})
    record = Record(chat_rows(1, seed=2)[0], "chat.jsonl", 1)
    messages = record.data["messages"]
    tokenizer = tokenizer_of(spec(tiny_model, chatTemplate=TEMPLATE), tmp_path)
    example = chat.example(record, tokenizer, data)
    assert tokenizer.decode(example.input_ids) == "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
    labelled = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert labelled == "".join(f"{m['content']}\n" for m in messages if m["role"] == "assistant")
    own = tokenizer_of(spec(tiny_model), tmp_path)
    assert tokenizer.decode(chat.example(record, own, data).input_ids).startswith("<|im_start|>system\n")


# -- spec.training.dropout ------------------------------------------------------------------------------


def test_dropout_sets_the_models_dropout_probabilities(tiny_model: Path, tmp_path: Path) -> None:
    """spec.training.dropout replaces every dropout probability of the model's config, and the attention
    layers train with it; without it the model's own (0 for the tiny Llama) stays."""
    model = spec(tiny_model)
    assert modeling.dropout_overrides(source(model, tmp_path), model, 0.3) == {"attention_dropout": 0.3}
    for dropout, expected in ((0.3, 0.3), (None, 0.0)):
        loaded = load(model, tmp_path, dropout=dropout)
        assert loaded.config.attention_dropout == expected
        assert {layer.self_attn.attention_dropout for layer in loaded.model.layers} == {expected}
