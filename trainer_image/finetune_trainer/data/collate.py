"""Batching: :func:`pad_right`, which every task's collator pads with, and the causal-LM collator
(padded rows, or packed rows kept apart).

Packed rows of a batch stay separate rows ([batch, longest row]), padded at the end with a segment of
their own (positions restarting at 0, labels ignored), so attention costs grow with each row's length,
not the batch's; transformers builds their per-row block-diagonal causal mask from the positions (sdpa
and eager attention). Flash-attention kernels detect packed samples only in a single row
(transformers' varlen path needs batch size 1): for them the collator flattens the batch into one
padding-free row instead. Without packing, batches are right-padded. Either way training must run
without a KV cache: with one, transformers skips the packed-sequence mask and samples would attend to
each other.
"""

from __future__ import annotations

from typing import Any

import torch

from .examples import IGNORE

# Attention implementations whose masks transformers builds per row from restarting position_ids
# (masking_utils.find_packed_sequence_indices); any other kernel gets one flattened row.
PER_ROW_PACKED_ATTENTION = frozenset({"sdpa", "eager"})


def pad_right(features: list[dict[str, Any]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch: each row's ``input_ids`` padded on the right with
    ``pad_token_id`` to the longest row, the mask 1 over the real tokens."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"])
        mask[row, :n] = 1
    return input_ids, mask


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
        input_ids, mask = pad_right(features, self.pad_token_id)
        labels = torch.full_like(input_ids, IGNORE)
        for row, f in enumerate(features):
            labels[row, : len(f["labels"])] = torch.tensor(f["labels"])
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
