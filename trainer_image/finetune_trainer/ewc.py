"""Elastic weight consolidation (``training.forgetting.ewc``) for the causal-LM recipe.

**The Fisher information.** Before the first step, the diagonal of the *empirical* Fisher information
of the trainable parameters θ is estimated: ``F = 1/n · Σ_i (∇_θ l_i)²``, the mean over n samples of
the squared gradient of sample i's LM loss l_i (the model's mean token cross-entropy on the sample's
own labels — the empirical Fisher, not the true Fisher, whose targets would be sampled from the
model). Samples are rows of batch size one, the model in eval mode (no dropout), gradients taken with
``torch.autograd.grad`` (no ``.grad`` is touched); a row without a target token is skipped. The data is
``ewc.fisherData``, else the replay source, else ``generalEval``, else the training rows as trained;
``fisherSamples`` of its rows are chosen by the seed (all of them when it has fewer). Under DDP each
rank takes every world-size-th chosen row and the sums (and the count) are all-reduced: the Fisher is
the same on every rank.

**The anchor.** θ₀ is the trainable parameters' values before training (an fp32 copy). Under a PEFT
method θ is what is trained — with LoRA the adapter weights, whose θ₀ is their initialization (B = 0,
A random), so the penalty pulls the adapter's update B·A toward zero, more strongly along the
directions the general data's loss is sensitive to. F and θ₀ (two fp32 copies of the trainable
parameters, on the accelerator) make the *anchor*, written once, before training, to
``<checkpoint dir>/ewc-anchor/`` (``anchor.safetensors``, then ``anchor.json``, the commit marker
written last, with the file's sha256 and the key of what it was computed from: the spec's checkpoint
hash, the data's cache key and the trainable parameters' names and shapes). A resumed run reads it
(verified) instead of estimating again — the very tensors of the first attempt — and broadcasts it
from rank 0; one that is missing or does not verify is estimated again (the weights before
``train()`` are the initial ones in every attempt, so θ₀ is the same). Without a checkpoint directory
the anchor lives in the work directory.

**The penalty.** Every training micro-batch's loss gets ``λ/2 · Σ F·(θ - θ₀)²`` (λ = ``strength``),
scaled as transformers scales the loss for gradient accumulation, so each optimizer step's gradient
is the LM loss's plus the penalty's. Its value (the term added) is logged as ``ewc_penalty`` with the
loss (which includes it), and exported as the ``finetune_ewc_penalty`` gauge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from finetune_operator.api.trainer_config import TrainerConfig, checkpoint_hash
from safetensors.torch import load_file, save_file

from . import distributed, storage
from .distributed import World
from .file_manifest import sha256_file

log = logging.getLogger(__name__)

ANCHOR_DIR = "ewc-anchor"
ANCHOR_FILE = "anchor.safetensors"
MARKER = "anchor.json"
#: Bumped when the anchor's layout or meaning changes: older anchors are then never read.
VERSION = 1
_FISHER_STREAM = 0xE3C


@dataclass
class Anchor:
    """The trainable parameters with their Fisher information and values before training."""

    names: list[str]
    params: list[torch.nn.Parameter]
    fisher: list[torch.Tensor]
    theta0: list[torch.Tensor]
    strength: float
    samples: int

    def distance(self) -> torch.Tensor:
        """Σ F·(θ - θ₀)² (differentiable in θ), in fp32."""
        terms = [
            (f * (p.float() - t0).square()).sum()
            for p, f, t0 in zip(self.params, self.fisher, self.theta0, strict=True)
        ]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def penalty(self) -> torch.Tensor:
        """λ/2 · Σ F·(θ - θ₀)², the term added to the loss."""
        return self.strength / 2 * self.distance()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"fisher/{n}": f.detach().cpu().contiguous() for n, f in zip(self.names, self.fisher, strict=True)}
        out.update({f"theta0/{n}": t.detach().cpu().contiguous() for n, t in zip(self.names, self.theta0, strict=True)})
        return out


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters EWC anchors: those that require a gradient, by name."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def sample_indices(rows: int, samples: int, seed: int) -> list[int]:
    """The rows the Fisher is averaged over: ``samples`` of ``rows`` chosen by the seed (sorted), or all."""
    if samples >= rows:
        return list(range(rows))
    chosen = np.random.default_rng([seed, _FISHER_STREAM]).permutation(rows)[:samples]
    return sorted(int(i) for i in chosen)


def estimate_fisher(
    model: torch.nn.Module,
    rows: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    indices: Sequence[int],
    *,
    world: World,
    device: torch.device,
    autocast: Callable[[], Any] | None = None,
) -> tuple[list[torch.Tensor], int]:
    """The empirical Fisher diagonal of the trainable parameters (see the module docstring) over the
    rows ``indices`` names (this rank takes every world-size-th), and the number of samples it averages."""
    params = [p for _, p in trainable(model)]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for index in indices[world.rank :: world.world_size]:
            batch = collate([rows[int(index)]])
            if not bool((batch["labels"][:, 1:] != -100).any()):
                continue  # no target token: no loss to differentiate
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                loss = model(**inputs).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, grad in zip(sums, grads, strict=True):
                if grad is not None:
                    total.add_(grad.float().square())
            count += 1
    finally:
        model.train(was_training)
    if distributed.group_backend() is not None:
        for total in sums:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    n = int(count.item())
    if n == 0:
        from .data.records import DataError

        raise DataError(["spec.training.forgetting.ewc: no sample of the Fisher data has a token to predict"])
    return [total / n for total in sums], n


class AnchorStore:
    """Where a run's anchor lives: ``<checkpoint dir>/ewc-anchor/`` (the work directory's without one)."""

    def __init__(self, config: TrainerConfig):
        work = Path(config.work_dir)
        self.local = work / ANCHOR_DIR
        c = config.spec.checkpoint
        self.uri = f"{config.checkpoint_dir.rstrip('/')}/{ANCHOR_DIR}" if config.checkpoint_dir else str(self.local)
        self.fs, root = storage.filesystem(self.uri, config.base_dir, endpoint_url=c.endpoint_url, region=c.region)
        self.root = root.rstrip("/")

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        """The committed anchor of ``key``, verified (None when there is none, of another key, or it
        does not verify)."""
        self.fs.invalidate_cache()
        try:
            marker = json.loads(self.fs.cat_file(f"{self.root}/{MARKER}"))
        except (OSError, ValueError):
            return None
        if marker.get("version") != VERSION or marker.get("key") != key:
            return None
        self.local.mkdir(parents=True, exist_ok=True)
        copy = self.local / f"{ANCHOR_FILE}.read"
        try:
            self.fs.get_file(f"{self.root}/{ANCHOR_FILE}", str(copy))
        except OSError as exc:
            log.warning("ewc: cannot read the anchor %s/%s (%s): estimating again", self.uri, ANCHOR_FILE, exc)
            return None
        if sha256_file(copy) != marker.get("sha256"):
            log.warning(
                "ewc: the anchor %s/%s does not match its marker's sha256: estimating again", self.uri, ANCHOR_FILE
            )
            return None
        return load_file(str(copy))

    def write(self, key: str, anchor: Anchor, details: dict[str, Any]) -> None:
        """Write the anchor (uncommitting an older one first), the marker last."""
        self.local.mkdir(parents=True, exist_ok=True)
        local = self.local / ANCHOR_FILE
        save_file(anchor.tensors(), str(local))
        marker = {
            "version": VERSION,
            "key": key,
            "sha256": sha256_file(local),
            "bytes": local.stat().st_size,
            **details,
        }
        remote_marker, remote_file = f"{self.root}/{MARKER}", f"{self.root}/{ANCHOR_FILE}"
        if self.fs.exists(remote_marker):
            self.fs.rm_file(remote_marker)
        if Path(remote_file) != local:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.put_file(str(local), remote_file)
        self.fs.pipe_file(remote_marker, json.dumps(marker, indent=1).encode())


def anchor_key(config: TrainerConfig, data_key: str, names: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    """What an anchor is computed from: the spec's checkpoint hash, the data and the trained parameters."""
    described = {"version": VERSION, "spec": checkpoint_hash(config.spec), "data": data_key, "params": list(names)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def prepare(
    config: TrainerConfig,
    model: torch.nn.Module,
    rows: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    source: str,
    data_key: str,
    world: World,
    device: torch.device,
    resumed: bool,
    autocast: Callable[[], Any] | None = None,
) -> Anchor:
    """The run's anchor: read from its store when resuming (and it is there), else estimated and
    written there (by rank 0). Every rank takes part; every rank gets the same anchor."""
    forgetting = config.spec.training.forgetting
    assert forgetting is not None and forgetting.ewc is not None
    ewc = forgetting.ewc
    named = trainable(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    key = anchor_key(config, data_key, [(n, tuple(p.shape)) for n, p in named])
    store = AnchorStore(config)
    found = store.read(key) if resumed and world.is_main else None
    if found is not None and set(found) != {f"{k}/{n}" for k in ("fisher", "theta0") for n in names}:
        found = None
    if distributed.broadcast_object(found is not None):
        fisher = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        theta0 = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        if found is not None:
            for n, f, t in zip(names, fisher, theta0, strict=True):
                f.copy_(found[f"fisher/{n}"])
                t.copy_(found[f"theta0/{n}"])
        if distributed.group_backend() is not None:
            for tensor in (*fisher, *theta0):
                dist.broadcast(tensor, src=0)
        samples = int(distributed.broadcast_object(_marker_samples(store) if world.is_main else 0))
        if world.is_main:
            print(f"ewc: the Fisher information and θ₀ read from {store.uri} (not estimated again)", flush=True)
        return Anchor(names, params, fisher, theta0, ewc.strength, samples)
    started = time.monotonic()
    theta0 = [p.detach().float().clone() for p in params]
    indices = sample_indices(len(rows), ewc.fisher_samples, config.spec.training.seed)
    fisher, samples = estimate_fisher(model, rows, collate, indices, world=world, device=device, autocast=autocast)
    anchor = Anchor(names, params, fisher, theta0, ewc.strength, samples)
    if world.is_main:
        store.write(key, anchor, {"samples": samples, "source": source})
        numel = sum(p.numel() for p in params)
        print(
            f"ewc: the Fisher information of {numel:,} trainable parameters estimated on {samples} samples of "
            f"{source} in {time.monotonic() - started:.1f} s; written to {store.uri}",
            flush=True,
        )
    distributed.barrier()
    return anchor


def _marker_samples(store: AnchorStore) -> int:
    try:
        return int(json.loads(store.fs.cat_file(f"{store.root}/{MARKER}")).get("samples", 0))
    except (OSError, ValueError):
        return 0
