"""The recommendation loss (BCE with one sampled negative) and the collaborative alignment loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_negatives(pos: torch.Tensor, num_items: int, generator: torch.Generator | None) -> torch.Tensor:
    """One uniform random item per positive, redrawn once where it hits the positive itself."""
    neg = torch.randint(1, num_items + 1, pos.shape, generator=generator, device=pos.device)
    redraw = torch.randint(1, num_items + 1, pos.shape, generator=generator, device=pos.device)
    return torch.where(neg == pos, redraw, neg)


def bce_loss(hidden: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor) -> torch.Tensor:
    """hidden, pos_emb, neg_emb: (n, h) for the n positions that have a target."""
    pos = (hidden * pos_emb).sum(-1)
    neg = (hidden * neg_emb).sum(-1)
    return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
            + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))


def alignment_loss(srs: torch.Tensor, llm: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric contrastive loss between collaborative (srs) and adapted LLM vectors of the same items.

    The soft targets are the mean of each side's self-similarity divided by the
    temperature; the reference multiplies by it, which sharpens instead of smoothing.
    """
    logits = srs @ llm.T / temperature
    targets = F.softmax((srs @ srs.T + llm @ llm.T) / 2 / temperature, dim=-1)
    # The llm side's loss is the srs side's on the transposed matrices; summing along the other axis
    # of the same matrices gives it without copying two transposes.
    loss_srs = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    loss_llm = -(targets * F.log_softmax(logits, dim=0)).sum(0)
    return (loss_srs + loss_llm).mean() / 2
