"""The torch.distributed calls stage code needs, each a no-op for a single worker.

Models, losses and trainers stay plain PyTorch: they call these with the world size they were given.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def mean_over_workers(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every worker's `obj`, in rank order (a collective: every worker must call it)."""
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def data_parallel(module: nn.Module, world: int) -> nn.Module:
    """DDP over the group when there are several workers; buffers are frozen inputs, never broadcast."""
    return nn.parallel.DistributedDataParallel(module, broadcast_buffers=False) if world > 1 else module


def gather_with_local_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All workers' rows stacked in rank order, and where this worker's rows start.

    all_gather returns tensors without autograd history; putting the local tensor back
    in its slot lets gradients flow through this worker's part (the others' parts are
    constants here and get their gradients on their own workers).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = x
    return torch.cat(parts), rank * x.size(0)
