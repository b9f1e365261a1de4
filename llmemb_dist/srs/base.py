"""What the three backbones share: item lookup, reverse positions, next-item training, scoring."""
from __future__ import annotations

import torch
from torch import nn

from llmemb_dist.srs.losses import bce_loss, sample_negatives


def reverse_positions(seqs: torch.Tensor) -> torch.Tensor:
    """1 for the last item, 2 for the one before, ..., 0 for padding.

    Counting from the end gives the same positions as the reference's padding to a
    fixed length, so a batch's padding width changes nothing in the output.
    """
    real = (seqs != 0).long()
    return real.flip(1).cumsum(1).flip(1) * real


class Dropout(nn.Dropout):
    """nn.Dropout with its mask drawn by torch.rand: the same distribution, faster on CPU than F.dropout's
    bernoulli_, a visible share of a training step (bench/rat_bench.py). Attention dropout stays inside SDPA."""

    def __init__(self, p: float):
        if not 0 <= p < 1:
            raise ValueError(f"rat.dropout must be in [0, 1), got {p}")
        super().__init__(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1 / (1 - self.p))


class SeqRecommender(nn.Module):
    """A backbone over an item representation; subclasses define `encode` (B, L) -> (B, L, hidden)."""

    def __init__(self, items: nn.Module, num_items: int):
        super().__init__()
        self.items = items
        self.num_items = num_items

    def encode(self, seqs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs at every position; `item_emb` (B, L, hidden) is self.items(seqs) when the caller has it."""
        raise NotImplementedError

    def rec_loss(self, seqs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Next-item BCE at every position of left-padded training sequences.

        Returns (loss, target items, their representations): the alignment loss reuses them."""
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        where = (inputs != 0) & (targets != 0)
        pos = targets[where]
        neg = sample_negatives(pos, self.num_items, generator)
        # One item lookup for inputs, positives and negatives: the LLM adapter then runs once per distinct item.
        emb = self.items(torch.cat([inputs.reshape(-1), pos, neg]))
        n_in, n_pos = inputs.numel(), len(pos)
        hidden = self.encode(inputs, emb[:n_in].view(*inputs.shape, -1))
        pos_emb = emb[n_in: n_in + n_pos]
        return bce_loss(hidden[where], pos_emb, emb[n_in + n_pos:]), pos, pos_emb

    def user_repr(self, seqs: torch.Tensor) -> torch.Tensor:
        """The state after each (left-padded) input sequence, (B, hidden)."""
        return self.encode(seqs)[:, -1]

    def scores(self, seqs: torch.Tensor) -> torch.Tensor:
        """Scores of every item index for each sequence, (B, num_items + 1); column 0 is padding."""
        return self.user_repr(seqs) @ self.items.table().T
