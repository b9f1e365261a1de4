"""Contrastive losses and embedding-quality metrics for SCFT, in plain PyTorch.

`info_nce` is our loss: symmetric InfoNCE on L2-normalised vectors with a learnable,
clamped temperature, negatives gathered from every worker. `reference_loss` is the
official LLMEmb code's loss (raw dot products, soft targets), kept for comparison.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmemb_dist.distributed.collective import gather_with_local_grad


class Temperature(nn.Module):
    """A learnable temperature, stored as a log so it stays positive, clamped in the forward.

    The clamp keeps InfoNCE from collapsing to a near-zero temperature (logits blow up)
    or drifting to a huge one (no contrast left).
    """

    def __init__(self, init: float, low: float, high: float):
        super().__init__()
        if not low <= init <= high:
            raise ValueError(f"temperature init {init} is outside [{low}, {high}]")
        # Shape [1], not a scalar: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.log_value = nn.Parameter(torch.tensor([math.log(init)]))
        self.low, self.high = low, high

    def forward(self) -> torch.Tensor:
        return self.log_value.float().exp().clamp(self.low, self.high)[0]


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE between two views (row i of `a` and of `b` are the same item).

    Each local view is scored against the other view of every item in the global batch;
    the positive is its own item's other view.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, offset = gather_with_local_grad(a) if gather else (a, 0)
    all_b, _ = gather_with_local_grad(b) if gather else (b, 0)
    labels = torch.arange(a.size(0), device=a.device) + offset
    loss_ab = F.cross_entropy(a @ all_b.T / temperature, labels)
    loss_ba = F.cross_entropy(b @ all_a.T / temperature, labels)
    return (loss_ab + loss_ba) / 2


def reference_loss(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The official code's loss: local batch only, raw dot products, soft targets.

    logits = a·bᵀ / t; targets = softmax((a·aᵀ + b·bᵀ) / 2 · t) (the reference multiplies
    by t here); cross-entropy with soft targets in both directions, averaged.
    """
    a, b = a.float(), b.float()
    logits = a @ b.T / temperature
    targets = F.softmax((a @ a.T + b @ b.T) / 2 * temperature, dim=-1)
    loss_ab = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    loss_ba = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(-1)
    return ((loss_ab + loss_ba) / 2).mean()


def alignment(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wang & Isola's alignment: mean squared distance between positive pairs (lower is better)."""
    a, b = F.normalize(a.detach().float(), dim=-1), F.normalize(b.detach().float(), dim=-1)
    return (a - b).pow(2).sum(-1).mean().item()


def uniformity(x: torch.Tensor) -> float:
    """Wang & Isola's uniformity: log E[exp(-2‖x−y‖²)] over distinct pairs (lower is more uniform)."""
    x = F.normalize(x.detach().float(), dim=-1)
    if x.size(0) < 2:
        return 0.0
    return torch.pdist(x).pow(2).mul(-2).exp().mean().log().item()
