"""Trainable embedding rows for tokens added to the vocabulary, on top of frozen embeddings.

When a method freezes the embeddings (every PEFT method, and ``full`` with a freeze), the rows of
tokens from ``spec.model.addTokens`` would keep their initial values. ``AddedTokenRows`` adds a trained
delta to those rows only: to the input embedding lookup, and to the output head's logits for those
tokens (the same delta when input and output embeddings are tied). It is saved beside an adapter as
``added_tokens.safetensors`` and folded into the weights when a merged model is written.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

ATTRIBUTE = "added_token_rows"


def weight(module: nn.Module) -> torch.Tensor:
    """An embedding's or output head's weight (``nn.Module`` types every attribute as Tensor | Module)."""
    return cast(torch.Tensor, module.weight)


def output_embeddings(model: PreTrainedModel) -> nn.Module | None:
    """The model's output head, None when it has none (transformers leaves the method unannotated)."""
    head: nn.Module | None = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    return head


class AddedTokenRows(nn.Module):
    def __init__(self, model: PreTrainedModel, token_ids: list[int]):
        super().__init__()
        if token_ids != list(range(token_ids[0], token_ids[0] + len(token_ids))):
            raise ValueError("added token ids must be contiguous")
        embedding = model.get_input_embeddings()
        output = output_embeddings(model)
        self.first = token_ids[0]
        self.count = len(token_ids)
        in_w = weight(embedding)
        self.input_delta = nn.Parameter(torch.zeros(self.count, in_w.shape[1], dtype=in_w.dtype, device=in_w.device))
        self.tied = output is None or output.weight is in_w
        self.output_delta: nn.Parameter | None = None
        if not self.tied:
            assert output is not None
            out_w = weight(output)
            self.output_delta = nn.Parameter(
                torch.zeros(self.count, out_w.shape[1], dtype=out_w.dtype, device=out_w.device)
            )
        self._handles = [embedding.register_forward_hook(self._on_embedding)]
        if output is not None:
            self._handles.append(output.register_forward_hook(self._on_logits))

    def _on_embedding(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        relative = args[0] - self.first
        inside = (relative >= 0) & (relative < self.count)
        delta = self.input_delta[relative.clamp(0, self.count - 1)] * inside.unsqueeze(-1).to(output.dtype)
        return output + delta

    def _on_logits(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        rows = self.input_delta if self.output_delta is None else self.output_delta
        extra = args[0].to(rows.dtype) @ rows.T
        right = output.shape[-1] - self.first - self.count
        return output + F.pad(extra, (self.first, right)).to(output.dtype)

    @torch.no_grad()
    def merge_into(self, model: PreTrainedModel) -> None:
        """Fold the deltas into the embedding (and untied head) weights and stop adding them."""
        for handle in self._handles:
            handle.remove()
        span = slice(self.first, self.first + self.count)
        weight(model.get_input_embeddings())[span] += self.input_delta
        if self.output_delta is not None:
            head = output_embeddings(model)
            assert head is not None  # an output delta exists only for an untied head
            weight(head)[span] += self.output_delta

    def state(self) -> dict[str, torch.Tensor]:
        state = {"input_delta": self.input_delta.detach().cpu(), "first": torch.tensor([self.first])}
        if self.output_delta is not None:
            state["output_delta"] = self.output_delta.detach().cpu()
        return state


def attach(base: PreTrainedModel, token_ids: list[int]) -> AddedTokenRows | None:
    """Make the added tokens' rows trainable when the embeddings are frozen; no-op otherwise."""
    if not token_ids or weight(base.get_input_embeddings()).requires_grad:
        return None
    rows = AddedTokenRows(base, token_ids)
    setattr(base, ATTRIBUTE, rows)
    return rows


def find(model: nn.Module) -> AddedTokenRows | None:
    for module in model.modules():
        if isinstance(module, AddedTokenRows):
            return module
    return None
