"""GRU4Rec (Hidasi et al. 2016): a GRU over the item sequence.

The GRU runs over packed sequences so the output does not depend on how much
left padding the batch has; outputs come back left-aligned like the other backbones.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmemb_dist.srs.base import Dropout, SeqRecommender


class GRU4Rec(SeqRecommender):
    def __init__(self, items: nn.Module, num_items: int, hidden: int, layers: int, dropout: float):
        super().__init__(items, num_items)
        self.emb_dropout = Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)

    def encode(self, seqs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        length = seqs.shape[1]
        item_emb = self.items(seqs) if item_emb is None else item_emb
        lengths = (seqs != 0).sum(1).clamp(min=1)
        # index j of a right-aligned row is index j + (L - len) of the left-aligned one, and back.
        shift = (length - lengths).unsqueeze(1)
        cols = torch.arange(length, device=seqs.device).unsqueeze(0)
        to_right = (cols + shift).clamp(max=length - 1)
        x = self.emb_dropout(torch.gather(item_emb, 1, to_right.unsqueeze(-1).expand(-1, -1, item_emb.shape[-1])))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=length)
        left = torch.gather(out, 1, (cols - shift).clamp(min=0).unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        return left * (seqs != 0).unsqueeze(-1)
