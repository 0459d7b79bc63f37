"""Distributed training through torchrun: the process's place in the group and the collectives the
trainer uses. Every helper is a no-op (or returns its input) in a single-process run.

DDP through torchrun only: rank, world size and local rank come from the environment torchrun
sets; the process group uses NCCL for CUDA tensors and gloo for CPU tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment, pick the device, and join the process group when WORLD_SIZE > 1.

    ``device``: ``auto`` (CUDA if available), ``cuda`` or ``cpu``. The group is created with
    ``cpu:gloo,cuda:nccl`` when CUDA exists, so CPU collectives (object gathers, CPU training)
    and CUDA collectives both work; plain ``gloo`` otherwise. Idempotent.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        use_cuda = torch.cuda.is_available()
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but torch sees no GPU (use trainer.device=cpu or auto)")
        use_cuda = True
    elif device == "cpu":
        use_cuda = False
    else:
        raise ValueError(f"trainer.device must be auto, cuda or cpu, got {device!r}")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return DistEnv(rank, world, local, dev)


def is_distributed() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """``t`` summed (or reduced with ``op``) over the ranks, in place; returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """``t`` replaced by its element-wise maximum over the ranks, in place; returns ``t``."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` replaced by rank ``src``'s copy, in place; returns ``t``."""
    if dist.is_initialized():
        dist.broadcast(t, src=src)
    return t


def barrier() -> None:
    """Wait for every rank."""
    if is_distributed():
        dist.barrier()


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if is_distributed():
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
