"""Training methods: which parameters of the model are trained, one module per method.

Each module has ``apply(model, ctx) -> model`` and a docstring saying what it supports; a method may
also define ``load_kwargs(ctx)`` (extra ``from_pretrained`` arguments, e.g. QLoRA's quantization) and
``callbacks(model, ctx)`` (trainer callbacks, e.g. AdaLoRA's budget schedule).
"""

from __future__ import annotations

from typing import Any, Protocol

from transformers import PreTrainedModel, TrainerCallback

from . import adalora, full, ia3, lora, prefix, prompt, qlora
from .context import MethodContext, TunedModel


class Method(Protocol):
    """What every method module defines (the optional hooks are looked up with getattr)."""

    def apply(self, model: PreTrainedModel, ctx: MethodContext) -> TunedModel: ...


METHODS: dict[str, Method] = {
    "full": full,
    "lora": lora,
    "qlora": qlora,
    "prefix": prefix,
    "prompt": prompt,
    "ia3": ia3,
    "adalora": adalora,
}


def load_kwargs(ctx: MethodContext) -> dict[str, Any]:
    hook = getattr(METHODS[ctx.spec.method.type], "load_kwargs", None)
    return hook(ctx) if hook else {}


def apply(model: PreTrainedModel, ctx: MethodContext) -> TunedModel:
    return METHODS[ctx.spec.method.type].apply(model, ctx)


def callbacks(model: TunedModel, ctx: MethodContext) -> list[TrainerCallback]:
    hook = getattr(METHODS[ctx.spec.method.type], "callbacks", None)
    return list(hook(model, ctx)) if hook else []


__all__ = ["METHODS", "Method", "MethodContext", "TunedModel", "apply", "callbacks", "load_kwargs"]
