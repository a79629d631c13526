"""Tiny distributed helpers, importable from anywhere (no dependency on the rest of the package)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (one collective) and return it.

    Methods pack every statistic they need into one tensor so that a step costs one all-reduce.
    Without a process group this is the identity.
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(params) -> None:
    """Average the gradients of parameters that live outside the DDP wrapper (a method's own heads)
    over all ranks: one all-reduce of one flat tensor. Without a process group, nothing happens."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = all_reduce_sum(torch.cat([g.flatten() for g in grads])) / world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
