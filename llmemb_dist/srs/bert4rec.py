"""Bert4Rec (Sun et al. 2019) as in the reference: bidirectional, masked items predicted with BCE.

Training masks each item with probability mask_prob and adds a copy of the batch with
only the last item masked, which is the situation at prediction time.
"""
from __future__ import annotations

import torch
from torch import nn

from llmemb_dist.srs.base import Dropout, SeqRecommender, reverse_positions
from llmemb_dist.srs.losses import Objective
from llmemb_dist.srs.sasrec import TransformerEncoder


class Bert4Rec(SeqRecommender):
    def __init__(self, items: nn.Module, num_items: int, hidden: int, layers: int, heads: int, dropout: float,
                 max_len: int, mask_prob: float):
        super().__init__(items, num_items)
        self.hidden, self.max_len, self.mask_prob = hidden, max_len, mask_prob
        self.mask_token = num_items + 1
        # Its own vector, so the mask works the same over ID and LLM item tables.
        self.mask_emb = nn.Parameter(torch.randn(hidden) * 0.01)
        self.pos_emb = nn.Embedding(max_len + 2, hidden, padding_idx=0)
        self.emb_dropout = Dropout(dropout)
        self.encoder = TransformerEncoder(hidden, layers, heads, dropout, causal=False)

    def encode(self, seqs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        item_emb = self.items(seqs.clamp(max=self.num_items)) if item_emb is None else item_emb
        x = torch.where((seqs == self.mask_token).unsqueeze(-1), self.mask_emb, item_emb)
        x = x * self.hidden**0.5 + self.pos_emb(reverse_positions(seqs))
        return self.encoder(self.emb_dropout(x), seqs)

    def rec_loss(self, seqs: torch.Tensor, generator: torch.Generator | None = None,
                 objective: Objective | None = None) -> tuple[torch.Tensor, ...]:
        objective = objective or Objective("bce", self.num_items)
        real = seqs != 0
        draw = torch.rand(seqs.shape, generator=generator, device=seqs.device) < self.mask_prob
        last_only = torch.zeros_like(real)
        last_only[:, -1] = True
        where = torch.cat([draw & real, last_only & real])
        both = torch.cat([seqs, seqs])
        inputs = torch.where(where, torch.full_like(both, self.mask_token), both)
        hidden = self.encode(inputs)
        pos = both[where]
        _, pos_emb, neg, neg_emb = self.lookup(pos, objective, generator)
        return objective(hidden[where], pos, pos_emb, neg, neg_emb), pos, pos_emb

    def over_items(self, table: torch.Tensor) -> None:
        super().over_items(table)
        self.mask_token = self.num_items + 1  # the mask is an index past the table

    def user_repr(self, seqs: torch.Tensor) -> torch.Tensor:
        # Predict the next item as a masked slot after the sequence (keeping max_len tokens).
        seqs = seqs[:, -(self.max_len - 1):]
        masks = torch.full_like(seqs[:, :1], self.mask_token)
        return self.encode(torch.cat([seqs, masks], dim=1))[:, -1]
