"""Experience replay (``training.forgetting.replay``): general-text rows mixed into every epoch.

An epoch of a run with replay holds every training row once and ``R = round(ratio / (1 - ratio) * N)``
replay rows (N training rows; :func:`replay_rows_per_epoch`), shuffled together: the replay fraction of
the epoch is ``R / (N + R)``, the ratio up to that rounding, and each batch holds ``ratio`` of replay
rows on average (the count of a batch of b rows is hypergeometric). Replay rows are taken from the
replay data in shuffled passes (every row of a pass before any row twice), continuing across epochs
(epoch e takes picks ``e*R .. (e+1)*R - 1`` of the stream), so a replay source larger than R per epoch
is covered over the epochs.

What an epoch yields depends only on the seed and the epoch number (:class:`ReplaySampler`), as
:class:`.sampling.ClassBalancedSampler`'s: a run resumed mid-epoch (transformers skips the batches of
the interrupted epoch that were trained) trains on exactly the rows an uninterrupted run does;
:class:`.sampling.EpochSetter` sets the epoch from the trainer state. Every rank builds the same epoch;
accelerate gives each rank its share of the batches.

The Trainer's dataset is :class:`MixedRows`: indices below N are training rows, the others replay rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: A stream of the seed's generator of its own, apart from other samplers' (the ``[seed, epoch]`` ones).
_REPLAY_STREAM = 0x5E91A7


def replay_rows_per_epoch(train_rows: int, ratio: float) -> int:
    """The replay rows of an epoch of ``train_rows`` training rows: round(ratio / (1 - ratio) * rows),
    at least one (the API bounds ratio to (0, 1))."""
    return max(1, round(ratio / (1.0 - ratio) * train_rows))


class MixedRows(torch.utils.data.Dataset[dict[str, Any]]):
    """The training rows (indices ``0 .. len(train) - 1``) followed by the replay rows."""

    def __init__(
        self, train: torch.utils.data.Dataset[dict[str, Any]], replay: torch.utils.data.Dataset[dict[str, Any]]
    ):
        self.train = train
        self.replay = replay
        self.train_rows = len(train)  # type: ignore[arg-type]
        self.replay_rows = len(replay)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.train_rows + self.replay_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return self.train[index] if index < self.train_rows else self.replay[index - self.train_rows]

    def is_replay(self, index: int) -> bool:
        return int(index) >= self.train_rows


class ReplaySampler(torch.utils.data.Sampler[int]):
    """Indices into :class:`MixedRows` of one epoch (see the module docstring)."""

    def __init__(self, train_rows: int, replay_rows: int, ratio: float, seed: int):
        super().__init__()
        if train_rows < 1 or replay_rows < 1:
            raise ValueError("replay needs training rows and replay rows")
        self.train_rows = train_rows
        self.replay_rows = replay_rows
        self.per_epoch = replay_rows_per_epoch(train_rows, ratio)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.train_rows + self.per_epoch

    def replay_picks(self, epoch: int) -> np.ndarray[Any, Any]:
        """The replay rows (0-based, into the replay data) epoch ``epoch`` takes: picks ``epoch*R ..
        (epoch+1)*R - 1`` of the stream of shuffled passes over the replay data."""
        first, last = epoch * self.per_epoch, (epoch + 1) * self.per_epoch
        passes = range(first // self.replay_rows, (last - 1) // self.replay_rows + 1)
        stream = np.concatenate(
            [np.random.default_rng([self.seed, _REPLAY_STREAM, 0, p]).permutation(self.replay_rows) for p in passes]
        )
        offset = first - passes.start * self.replay_rows
        picks: np.ndarray[Any, Any] = stream[offset : offset + self.per_epoch]
        return picks

    def epoch_indices(self, epoch: int) -> list[int]:
        """What epoch ``epoch`` yields: every training row and the epoch's replay picks, shuffled together."""
        rows = np.concatenate([np.arange(self.train_rows), self.train_rows + self.replay_picks(epoch)])
        order = np.random.default_rng([self.seed, _REPLAY_STREAM, 1, epoch]).permutation(len(rows))
        indices: list[int] = rows[order].tolist()
        return indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch))
