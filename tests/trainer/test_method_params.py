"""What each parameter of spec.method does to the model, shown on tiny models without a training run.

Each test validates a manifest as admission does, builds a tiny Llama (tests/trainer/tiny.py: the
tokenizer and the config, random weights), applies the method as the trainer does
(``methods.load_kwargs``, ``methods.apply``, ``methods.callbacks``) and inspects what the parameter
changed: which parameters train, their shapes, the LoRA scaling, the 4-bit layers, what the saved
adapter holds, the AdaLoRA rank budget step by step. Every case would fail if its parameter were
ignored (a default in its place gives another result). Which artifacts ``spec.output.save`` writes is
shown by the runs of test_methods.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_operator.api.validation import validate_object
from finetune_trainer import methods, modeling
from finetune_trainer.outputs import load_adapter_for_inference
from safetensors.torch import load_file
from tiny import build_tokenizer, job_manifest, llama_config
from torch import nn
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

#: The linear layers of a tiny Llama block; ``all-linear`` adapts these in both blocks (not lm_head).
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = 2


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def job_spec(method: dict[str, Any], **overrides: Any) -> FineTuneJobSpec:
    """The spec of a manifest with this ``spec.method``, as admission accepts it."""
    manifest = job_manifest("params", Path("org/tiny"), Path("train.jsonl"), method=method, **overrides)
    return validate_object(manifest).spec


def tiny_llama(tokenizer: Any, **config: Any) -> LlamaForCausalLM:
    """A tiny Llama with random weights, the same ones on every call."""
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(tokenizer, **config))


def tuned(
    method: dict[str, Any], tokenizer: Any, *, total_steps: int = 20, **config: Any
) -> tuple[Any, methods.MethodContext]:
    """A tiny Llama with ``method`` applied from its spec, and the method's context."""
    ctx = methods.MethodContext(spec=job_spec(method), tokenizer=tokenizer, total_steps=total_steps)
    return methods.apply(tiny_llama(tokenizer, **config), ctx), ctx


def trainable(model: nn.Module) -> set[str]:
    """Names of the parameters that train, without peft's ``base_model.model.`` prefix."""
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


def batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    ids = tokenizer(["what color is the plum? the plum is purple"] * 2, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "labels": ids}


def saved_adapter(model: Any, directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Save ``model``'s adapter as the trainer's outputs do; return its tensors and its config."""
    model.save_pretrained(directory, safe_serialization=True)
    config = json.loads((directory / "adapter_config.json").read_text())
    return load_file(str(directory / "adapter_model.safetensors")), config


# --------------------------------------------------------------------------------------------------
# full: spec.method.freeze
# --------------------------------------------------------------------------------------------------

LAST_BLOCK = r"model\.layers\.1\..*"


@pytest.mark.parametrize(
    ("freeze", "tied", "trains"),
    [
        ({"headOnly": True}, False, r"lm_head\.weight"),
        # Tied: the head is the input embedding matrix (named once, as the embedding).
        ({"headOnly": True}, True, r"model\.embed_tokens\.weight"),
        ({"lastLayers": 1}, False, rf"{LAST_BLOCK}|model\.norm\.weight|lm_head\.weight"),
        # Tied: the head is an embedding, which lastLayers leaves frozen.
        ({"lastLayers": 1}, True, rf"{LAST_BLOCK}|model\.norm\.weight"),
        (
            {"patterns": [r"\.mlp\.", r"layers\.0\."]},
            False,
            r"model\.embed_tokens\.weight|model\.layers\.1\.(self_attn|input_layernorm|post_attention_layernorm)\..*"
            r"|model\.norm\.weight|lm_head\.weight",
        ),
        (
            {"lastLayers": 1, "patterns": ["self_attn"]},
            False,
            r"model\.layers\.1\.(mlp|.*layernorm)\..*|model\.norm\.weight|lm_head\.weight",
        ),
    ],
    ids=["head-only", "head-only-tied", "last-layer", "last-layer-tied", "patterns", "last-layer-and-patterns"],
)
def test_freeze_trains_exactly_what_it_leaves(freeze: dict[str, Any], tied: bool, trains: str, tokenizer: Any) -> None:
    model, _ = tuned({"type": "full", "freeze": freeze}, tokenizer, tie_embeddings=tied)
    names = {n for n, _ in model.named_parameters()}
    expected = {n for n in names if re.fullmatch(trains, n)}
    assert expected and expected != names
    assert trainable(model) == expected


# --------------------------------------------------------------------------------------------------
# lora (and the fields adalora shares): bias, modulesToSave, useRslora, useDora
# --------------------------------------------------------------------------------------------------


def _bias_owner(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.base_layer.bias`` -> ``0.q_proj``."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.\w+\.(\w+)\.(base_layer\.)?bias", name)
    assert match, name
    return f"{match.group(1)}.{match.group(2)}"


ADAPTED = ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("method", "bias", "owners"),
    [
        ("lora", "none", ()),
        ("lora", "all", BLOCK_LINEARS),
        ("lora", "lora_only", ADAPTED),
        ("adalora", "lora_only", ADAPTED),
    ],
    ids=["none", "all", "lora-only", "adalora-lora-only"],
)
def test_lora_bias_trains_and_saves_the_biases_it_names(
    method: str, bias: str, owners: tuple[str, ...], tokenizer: Any, tmp_path: Path
) -> None:
    lora = {"alpha": 8, "dropout": 0.0, "targetModules": list(ADAPTED), "bias": bias}
    spec: dict[str, Any] = {"type": method, "lora": lora}
    spec |= {"adalora": {"initR": 4, "targetR": 2}} if method == "adalora" else {"lora": {**lora, "r": 4}}
    model, _ = tuned(spec, tokenizer, attention_bias=True, mlp_bias=True)
    expected = {f"{layer}.{owner}" for layer in range(LAYERS) for owner in owners}
    assert {_bias_owner(n) for n in trainable(model) if n.endswith("bias")} == expected
    tensors, _ = saved_adapter(model, tmp_path)
    assert {_bias_owner(n.removeprefix("base_model.model.")) for n in tensors if n.endswith("bias")} == expected


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_lora_modules_to_save_are_trained_copies_saved_with_the_adapter(
    method: str, tokenizer: Any, tmp_path: Path
) -> None:
    lora = {"alpha": 8, "dropout": 0.0, "targetModules": ["q_proj"], "modulesToSave": ["lm_head"]}
    spec: dict[str, Any] = {"type": method, "lora": lora}
    spec |= {"adalora": {"initR": 4, "targetR": 2}} if method == "adalora" else {"lora": {**lora, "r": 4}}
    model, _ = tuned(spec, tokenizer)
    assert trainable(model) >= {"lm_head.modules_to_save.default.weight"}
    head = model.base_model.model.lm_head
    original = head.original_module.weight.detach().clone()
    assert not head.original_module.weight.requires_grad
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch(tokenizer)).loss.backward()
    optimizer.step()
    trained = head.modules_to_save["default"].weight.detach()
    assert (trained - original).abs().max() > 1e-4, "the copy trains"
    assert torch.equal(head.original_module.weight, original), "the base head stays as it was"
    tensors, _ = saved_adapter(model, tmp_path)
    torch.testing.assert_close(tensors["base_model.model.lm_head.weight"], trained, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("lora", "scaling"),
    [
        ({"r": 4, "alpha": 8}, 8 / 4),
        ({"r": 4, "alpha": 8, "useRslora": True}, 8 / math.sqrt(4)),
        ({"r": 4, "alpha": 8, "useDora": True}, 8 / 4),
    ],
    ids=["plain", "rslora", "dora"],
)
def test_lora_scaling_and_dora_magnitudes(lora: dict[str, Any], scaling: float, tokenizer: Any, tmp_path: Path) -> None:
    from peft.tuners.lora import LoraLayer

    model, _ = tuned({"type": "lora", "lora": {"dropout": 0.0, "targetModules": ["all-linear"], **lora}}, tokenizer)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == LAYERS * len(BLOCK_LINEARS)
    assert [m.scaling["default"] for m in layers.values()] == [pytest.approx(scaling)] * len(layers)
    magnitudes = {n for n in trainable(model) if ".lora_magnitude_vector." in n}
    tensors, _ = saved_adapter(model, tmp_path)
    if lora.get("useDora"):
        # One trained magnitude per output feature of every adapted layer, initialised to the norms
        # of the base weight's rows, and saved with the adapter.
        assert len(magnitudes) == len(layers)
        for layer in layers.values():
            magnitude = layer.lora_magnitude_vector["default"].weight
            base = layer.get_base_layer().weight
            assert magnitude.requires_grad
            torch.testing.assert_close(magnitude, base.norm(dim=1))
        assert sum(".lora_magnitude_vector" in n for n in tensors) == len(layers)
    else:
        assert not magnitudes
        assert not any("magnitude" in n for n in tensors)


# --------------------------------------------------------------------------------------------------
# ia3: targetModules, feedforwardModules
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ia3", "rescaled"),
    [
        # peft's mapping for Llama: keys, values, and the down projection on its input.
        (None, {"k_proj": False, "v_proj": False, "down_proj": True}),
        (
            {"targetModules": ["q_proj", "up_proj"], "feedforwardModules": ["up_proj"]},
            {"q_proj": False, "up_proj": True},
        ),
        ({"targetModules": ["q_proj", "up_proj"], "feedforwardModules": []}, {"q_proj": False, "up_proj": False}),
    ],
    ids=["defaults", "targets-and-feedforward", "no-feedforward"],
)
def test_ia3_rescales_the_modules_it_names(
    ia3: dict[str, Any] | None, rescaled: dict[str, bool], tokenizer: Any
) -> None:
    """A feed-forward module is rescaled on its input (a vector of in_features), the others on their
    output (out_features)."""
    from peft.tuners.ia3 import IA3Layer

    method: dict[str, Any] = {"type": "ia3"} | ({"ia3": ia3} if ia3 is not None else {})
    model, _ = tuned(method, tokenizer)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}
    assert len(layers) == LAYERS * len(rescaled)
    for name, layer in layers.items():
        kind = name.rsplit(".", 1)[-1]
        assert layer.is_feedforward == rescaled[kind], name
        base = layer.get_base_layer()
        shape = (1, base.in_features) if rescaled[kind] else (base.out_features, 1)
        assert tuple(layer.ia3_l["default"].shape) == shape, name
    assert {n.rsplit(".ia3_l", 1)[0].rsplit(".", 1)[-1] for n in trainable(model)} == set(rescaled)


# --------------------------------------------------------------------------------------------------
# prefix: numVirtualTokens, projection; prompt: numVirtualTokens, initText
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "tokens"),
    [
        ({"type": "prefix", "prefix": {"numVirtualTokens": 5}}, 5),
        ({"type": "prefix", "prefix": {"numVirtualTokens": 3, "projection": True}}, 3),
        ({"type": "prompt", "prompt": {"numVirtualTokens": 7}}, 7),
    ],
    ids=["prefix", "prefix-projection", "prompt"],
)
def test_virtual_tokens_are_trained_and_saved(
    method: dict[str, Any], tokens: int, tokenizer: Any, tmp_path: Path
) -> None:
    """The adapter holds ``numVirtualTokens`` trained rows (for a prefix, the key and value of every
    layer; with ``projection``, trained through an MLP whose output is what is saved), and the saved
    adapter computes what the trained model does."""
    model, _ = tuned(method, tokenizer)
    names = trainable(model)
    config = model.base_model.config
    if method["type"] == "prefix":
        width = LAYERS * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        projected = method["prefix"].get("projection", False)
        assert any(".transform." in n for n in names) == projected
    else:
        width = config.hidden_size
    with torch.no_grad():  # what training would do to the virtual tokens
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    tensors, saved_config = saved_adapter(model, tmp_path)
    assert tuple(tensors["prompt_embeddings"].shape) == (tokens, width)
    assert saved_config["num_virtual_tokens"] == tokens

    ids = batch(tokenizer)["input_ids"]

    def logits(m: nn.Module) -> torch.Tensor:  # of the input's tokens (a soft prompt's come first)
        with torch.no_grad():
            return m.eval()(input_ids=ids).logits[:, -ids.shape[1] :]

    reloaded = logits(load_adapter_for_inference(tiny_llama(tokenizer), tmp_path))
    torch.testing.assert_close(reloaded, logits(model))
    assert (reloaded - logits(tiny_llama(tokenizer))).abs().max() > 1e-2


@pytest.mark.parametrize("init_text", ["what color", None], ids=["init-text", "random"])
def test_prompt_init_text_initialises_the_soft_prompt(init_text: str | None, tokenizer: Any) -> None:
    """With initText, the soft prompt starts as the embeddings of its tokens, repeated to the length."""
    prompt: dict[str, Any] = {"numVirtualTokens": 5} | ({"initText": init_text} if init_text else {})
    model, _ = tuned({"type": "prompt", "prompt": prompt}, tokenizer)
    soft_prompt = model.prompt_encoder["default"].embedding.weight
    ids = tokenizer("what color", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    embeddings = tiny_llama(tokenizer).get_input_embeddings().weight
    text_rows = embeddings[[ids[0], ids[1], ids[0], ids[1], ids[0]]]
    if init_text:
        torch.testing.assert_close(soft_prompt, text_rows, atol=0, rtol=0)
    else:
        assert not torch.allclose(soft_prompt, text_rows)
    assert soft_prompt.requires_grad


# --------------------------------------------------------------------------------------------------
# adalora: initR, targetR, tinit, tfinal, deltaT, beta1, beta2, orthRegWeight
# --------------------------------------------------------------------------------------------------


def documented_budget(step: int, total: int, init: int, target: int, tinit: int, tfinal: int, delta_t: int) -> int:
    """Triplets (rank-1 components) left after optimizer step ``step`` (1-based) of ``total``, as
    spec.method.adalora documents the schedule: the initial budget for ``tinit`` warm-up steps, a
    cubic decrease to the target budget reallocated every ``deltaT`` steps, the target from
    ``total - tfinal`` on. Between two reallocations every triplet trains again (the pruning is soft
    until the schedule ends)."""
    if step <= tinit:
        return init
    if step >= total - tfinal:
        return target
    if step % delta_t:
        return init
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init - target) * remaining**3 + target)


class TripletCount(TrainerCallback):
    """After each optimizer step (and the budget schedule's reallocation), the triplets left."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.counts: list[int] = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        values = [p for n, p in self.model.named_parameters() if ".lora_E." in n]
        self.counts.append(sum(int(torch.count_nonzero(p)) for p in values))


@pytest.mark.parametrize(
    ("adalora", "total"),
    [
        ({"initR": 6, "targetR": 2, "tinit": 2, "tfinal": 2, "deltaT": 2}, 9),
        # tfinal 0: the last step allocates the target budget.
        ({"initR": 6, "targetR": 2, "deltaT": 2}, 6),
    ],
    ids=["warm-up-and-final-steps", "to-the-last-step"],
)
def test_adalora_budget_follows_the_schedule(
    adalora: dict[str, int], total: int, tokenizer: Any, tmp_path: Path
) -> None:
    """A real Trainer with the method's callbacks: the triplets left after every step follow the
    documented schedule, and the saved adapter has the target ranks."""
    method = {"type": "adalora", "lora": {"alpha": 8, "dropout": 0.0}, "adalora": adalora}
    model, ctx = tuned(method, tokenizer, total_steps=total)
    values = {n: p for n, p in model.named_parameters() if ".lora_E." in n}
    assert len(values) == LAYERS * len(BLOCK_LINEARS)
    assert {tuple(p.shape) for p in values.values()} == {(adalora["initR"], 1)}
    count = TripletCount(model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "trainer"),
            max_steps=total,
            per_device_train_batch_size=2,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=[{k: v[0] for k, v in batch(tokenizer).items()}] * 2 * total,
        callbacks=[*methods.callbacks(model, ctx), count],
    )
    trainer.train()

    init, target = adalora["initR"] * len(values), adalora["targetR"] * len(values)
    schedule = {k: adalora.get(k, 0) for k in ("tinit", "tfinal")}
    expected = [
        documented_budget(step, total, init, target, delta_t=adalora["deltaT"], **schedule)
        for step in range(1, total + 1)
    ]
    assert count.counts == expected
    tensors, config = saved_adapter(model, tmp_path / "adapter")
    assert sum(t.shape[0] for n, t in tensors.items() if ".lora_E" in n) == target
    assert sum(sum(mask) for mask in config["rank_pattern"].values()) == target


def test_adalora_importance_and_orthogonality_weights(tokenizer: Any) -> None:
    """beta1 and beta2 are the importance averages' factors; orthRegWeight weighs the orthogonality
    penalty added to the training loss, not to an evaluation's (the adapter starts as a zero update,
    so the loss without the penalty is the base model's)."""

    def adalora(**params: float) -> Any:
        method = {"type": "adalora", "lora": {"dropout": 0.0}, "adalora": {"initR": 4, "targetR": 2, **params}}
        return tuned(method, tokenizer)[0].train()

    model = adalora(beta1=0.6, beta2=0.7, orthRegWeight=0.0)
    allocator = model.base_model.rankallocator
    assert (allocator.beta1, allocator.beta2) == (0.6, 0.7)
    inputs = batch(tokenizer)
    losses = {w: float(adalora(orthRegWeight=w)(**inputs).loss) for w in (1.0, 2.0)}
    plain = float(model(**inputs).loss)
    assert plain == pytest.approx(float(tiny_llama(tokenizer)(**inputs).loss), abs=1e-6)
    penalty = losses[1.0] - plain
    assert penalty > 1e-3
    assert losses[2.0] - plain == pytest.approx(2 * penalty, rel=1e-4)
    # Evaluation measures the data alone; the saved config keeps the weight.
    evaluated = adalora(orthRegWeight=2.0).eval()
    assert float(evaluated(**inputs).loss) == pytest.approx(plain, abs=1e-6)
    assert evaluated.peft_config["default"].orth_reg_weight == 2.0


# --------------------------------------------------------------------------------------------------
# qlora: spec.method.quantization
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny_llama(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("random-tiny-llama")
    tiny_llama(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("quantization", "quant_type", "double_quant", "compute_dtype"),
    [
        (None, "nf4", True, torch.bfloat16),
        ({"quantType": "fp4", "doubleQuant": False, "computeDtype": "fp16"}, "fp4", False, torch.float16),
        ({"computeDtype": "fp32"}, "nf4", True, torch.float32),
    ],
    ids=["defaults", "fp4-single-fp16", "fp32"],
)
def test_quantization_reaches_every_4bit_layer(
    quantization: dict[str, Any] | None,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    saved_tiny_llama: Path,
    tokenizer: Any,
) -> None:
    """Loaded and prepared as the trainer does: every linear layer of the blocks is 4-bit with the
    spec's data type, double quantization (a quantized quantization state) and compute dtype."""
    from bitsandbytes.nn import Linear4bit

    method: dict[str, Any] = {"type": "qlora", "lora": {"r": 4, "dropout": 0.0}}
    method |= {"quantization": quantization} if quantization is not None else {}
    spec = job_spec(method, model__dtype="bf16")
    ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=20)
    source = modeling.ModelSource(str(saved_tiny_llama), None, None, True)
    base = modeling.load_causal_lm(
        source, spec.model, dtype=modeling.model_dtype(spec.model.dtype), **methods.load_kwargs(ctx)
    )
    model = methods.apply(base, ctx)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == LAYERS * len(BLOCK_LINEARS)
    for layer in layers:
        assert layer.weight.quant_type == quant_type
        assert layer.weight.quant_state.nested == double_quant
        assert layer.compute_dtype == compute_dtype
    assert torch.isfinite(model(**batch(tokenizer)).loss)
