"""Next-item objectives and the collaborative alignment loss.

Three objectives, the same for every backbone and item representation (`rat.loss`):
- `bce`: the reference's binary cross-entropy with one uniform negative per positive;
- `ce`: softmax cross-entropy over the whole catalog;
- `sampled_softmax`: softmax over negatives shared by the batch (its other targets plus uniform
  draws) with the log-Q correction, for catalogs too large to score in full at every step.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def full_softmax_loss(hidden: torch.Tensor, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's target among every item; `table` row 0 (padding) is never a class."""
    logits = hidden @ table.T
    logits[:, 0] = -torch.inf
    return F.cross_entropy(logits, pos)


def sampled_softmax_loss(hidden: torch.Tensor, pos: torch.Tensor, pos_emb: torch.Tensor, neg: torch.Tensor,
                         neg_emb: torch.Tensor, log_q_pos: torch.Tensor, log_q_neg: torch.Tensor) -> torch.Tensor:
    """Softmax over the target and K shared negatives, every logit less log Q of its item.

    log Q is the log of how often the sampler proposes an item; subtracting it makes the sampled
    softmax an unbiased stand-in for the full one (Bengio & Senecal 2008; Yi et al. 2019), which
    matters for in-batch negatives: popular items are proposed often and would otherwise be pushed
    down too hard. A negative that is the position's own target (an accidental hit) is masked out.
    """
    pos_logit = (hidden * pos_emb).sum(-1, keepdim=True) - log_q_pos[:, None]
    neg_logits = (hidden @ neg_emb.T - log_q_neg[None, :]).masked_fill(neg[None, :] == pos[:, None], -torch.inf)
    logits = torch.cat([pos_logit, neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device))


class Objective(nn.Module):
    """The next-item loss of `kind` over the positions that have a target.

    `negatives` says which items the loss needs besides the targets, so the caller looks them all up
    in one pass through the item representation: one per position (bce), a set shared by the batch
    (sampled_softmax), or None for the whole table (ce).
    """

    def __init__(self, kind: str, num_items: int, num_negatives: int = 0, popularity: np.ndarray | None = None):
        super().__init__()
        if kind not in ("bce", "ce", "sampled_softmax"):
            raise ValueError(f"unknown rat.loss {kind!r}")
        self.kind, self.num_items, self.num_negatives = kind, num_items, num_negatives
        counts = np.ones(num_items + 1) if popularity is None else np.asarray(popularity, dtype=np.float64)
        counts[0] = 0.0
        # The share of training targets each item is: how often an in-batch negative proposes it.
        self.register_buffer("target_share", torch.as_tensor(counts / max(counts.sum(), 1.0), dtype=torch.float64),
                             persistent=False)

    def negatives(self, pos: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
        if self.kind == "ce":
            return None
        if self.kind == "bce":
            return sample_negatives(pos, self.num_items, generator)
        uniform = torch.randint(1, self.num_items + 1, (self.num_negatives,), generator=generator, device=pos.device)
        return torch.cat([pos.unique(), uniform])

    def log_q(self, items: torch.Tensor, batch_targets: int) -> torch.Tensor:
        """Log of the expected number of times the sampler proposes each item: in-batch plus uniform."""
        share = self.target_share[items]
        in_batch = -torch.expm1(batch_targets * torch.log1p(-share))  # P(item among the batch's targets)
        return torch.log(in_batch + self.num_negatives / self.num_items).float()

    def forward(self, hidden: torch.Tensor, pos: torch.Tensor, pos_emb: torch.Tensor, neg: torch.Tensor | None,
                neg_emb: torch.Tensor) -> torch.Tensor:
        """`neg_emb` is the whole item table when `neg` is None (ce)."""
        if self.kind == "ce":
            return full_softmax_loss(hidden, neg_emb, pos)
        if self.kind == "bce":
            return bce_loss(hidden, pos_emb, neg_emb)
        return sampled_softmax_loss(hidden, pos, pos_emb, neg, neg_emb, self.log_q(pos, len(pos)),
                                    self.log_q(neg, len(pos)))


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
