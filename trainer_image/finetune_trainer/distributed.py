"""Where this process sits in the gang, as torchrun describes it, and the few collectives we need."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place: global rank, local rank on the node, and sizes."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def from_env(cls) -> World:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)


def backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def group_backend() -> str | None:
    """The collective backend of this process's group (:func:`init` chose it), or None without one: a
    single process has no collectives."""
    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return None


def init(world: World, requested_backend: str, *, deepspeed: bool) -> None:
    """Bring the process group up before any model is built (ZeRO-3 partitions at construction).

    A single process (without DeepSpeed, whose engine wants a group even of one) gets none: torchrun
    still sets LOCAL_RANK, from which accelerate on CPU starts a gloo group of one and wraps the model
    in DistributedDataParallel, costing a gradient-bucket copy and an all-reduce every step for nothing.
    """
    if not world.distributed and not deepspeed:
        os.environ.pop("LOCAL_RANK", None)
    if not world.distributed or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    name = backend(requested_backend)
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=name)
    else:
        dist.init_process_group(backend=name)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def local_main_first(world: World) -> Iterator[None]:
    """Run the body on local rank 0 first (e.g. a download), then on the other ranks of the node."""
    if not world.is_local_main:
        barrier()
    try:
        yield
    finally:
        if world.is_local_main:
            barrier()


def teardown() -> None:
    """Destroy the process group cleanly, so no rank aborts at exit (seen with ZeRO-3 otherwise)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.barrier()
        dist.destroy_process_group()


def agree(flags: list[bool], device: Any = "cpu") -> list[bool]:
    """Each flag is true everywhere if it is true on any rank (one tiny all-reduce; free when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(flags)
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def mean(value: float, device: Any = "cpu") -> float:
    """The mean of ``value`` over every rank (one tiny all-reduce; the value itself when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s object on every rank (pickled; for small decisions only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
