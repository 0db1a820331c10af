"""Class-balanced epochs for classification (``task.classification.resampling``).

:class:`ClassBalancedSampler` yields, each epoch, the same number of examples of every class present
in the training data:

- ``oversample``: as many as the largest class has. Every class's examples are taken in shuffled
  passes, so within an epoch each example of a class of ``n`` appears ``target // n`` or
  ``target // n + 1`` times (not drawn with replacement: no example is left out by chance);
- ``undersample``: as many as the smallest class has, a fresh random subset of each larger class
  every epoch.

An epoch is the classes' picks shuffled together. What an epoch yields depends only on the seed and
the epoch number, never on what was drawn before: a run resumed mid-epoch (transformers skips the
batches of the interrupted epoch that were trained) sees exactly what an uninterrupted run sees. The
Trainer calls ``set_epoch`` before each epoch; :class:`EpochSetter` makes sure of it from the trainer
state (accelerate does not reach a sampler under a skipped, sharded batch sampler). Every rank builds
the same epoch; accelerate gives each rank its share of the batches, as with transformers' own sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from transformers import TrainerCallback

from .replay import ReplaySampler

Resampling = Literal["oversample", "undersample"]


class ClassBalancedSampler(torch.utils.data.Sampler[int]):
    """Indices of a class-balanced epoch (see the module docstring); ``classes[i]`` is example i's class."""

    def __init__(self, classes: Sequence[int], mode: Resampling, seed: int):
        super().__init__()
        groups: dict[int, list[int]] = {}
        for index, label in enumerate(classes):
            groups.setdefault(label, []).append(index)
        if not groups:
            raise ValueError("no examples to sample")
        self.groups = [groups[label] for label in sorted(groups)]
        sizes = [len(g) for g in self.groups]
        self.per_class = max(sizes) if mode == "oversample" else min(sizes)
        self.mode = mode
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_class * len(self.groups)

    def epoch_indices(self, epoch: int) -> list[int]:
        """What epoch ``epoch`` yields."""
        rng = np.random.default_rng([self.seed, epoch])
        picked: list[int] = []
        for members in self.groups:
            passes = math.ceil(self.per_class / len(members))
            order = np.concatenate([rng.permutation(len(members)) for _ in range(passes)])[: self.per_class]
            picked.extend(members[i] for i in order)
        return [picked[i] for i in rng.permutation(len(picked))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch))


class EpochSetter(TrainerCallback):
    """Sets the sampler's epoch when an epoch begins: the integer part of the trainer state's epoch
    (after a resume, the epoch the checkpoint was saved in; transformers counts it the same way)."""

    def __init__(self, sampler: ClassBalancedSampler | ReplaySampler):
        self.sampler = sampler

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sampler.set_epoch(math.floor(state.epoch or 0))
