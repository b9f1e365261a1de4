"""SASRec (Kang & McAuley 2018) as in the reference, but causal: position t never sees items after t."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmemb_dist.srs.base import Dropout, SeqRecommender, reverse_positions


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, query: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        w_q, w_kv = self.qkv.weight.split([h, 2 * h]), self.qkv.bias.split([h, 2 * h])
        q = F.linear(query, w_q[0], w_kv[0])
        k, v = F.linear(x, w_q[1], w_kv[1]).chunk(2, dim=-1)
        split = lambda t: t.view(b, length, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            split(q), split(k), split(v), attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(out.transpose(1, 2).reshape(b, length, h))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, hidden), Dropout(dropout), nn.ReLU(), nn.Linear(hidden, hidden), Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class TransformerEncoder(nn.Module):
    """The reference's block: x = LN(x) + Attn(LN(x), x); x = FFN(LN(x)) with its own residual."""

    def __init__(self, hidden: int, layers: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.causal = causal
        self.attn_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(layers))
        self.attns = nn.ModuleList(Attention(hidden, heads, dropout) for _ in range(layers))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(layers))
        self.ffns = nn.ModuleList(FeedForward(hidden, dropout) for _ in range(layers))
        self.last_norm = nn.LayerNorm(hidden, eps=1e-8)

    def forward(self, x: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        real = seqs != 0
        length = seqs.shape[1]
        allowed = real[:, None, None, :]  # (B, 1, 1, L): never attend to padding keys
        if self.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        # A padding query would see no key at all (NaN softmax): let every query see itself.
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=seqs.device)
        keep = real.unsqueeze(-1)
        x = x * keep
        for attn_norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            q = attn_norm(x)
            x = q + attn(q, x, allowed)
            x = ffn(ffn_norm(x)) * keep
        return self.last_norm(x)


class SASRec(SeqRecommender):
    def __init__(self, items: nn.Module, num_items: int, hidden: int, layers: int, heads: int, dropout: float, max_len: int):
        super().__init__(items, num_items)
        self.hidden = hidden
        self.pos_emb = nn.Embedding(max_len + 2, hidden, padding_idx=0)
        self.emb_dropout = Dropout(dropout)
        self.encoder = TransformerEncoder(hidden, layers, heads, dropout, causal=True)

    def embed(self, item_emb: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        x = item_emb * self.hidden**0.5 + self.pos_emb(reverse_positions(seqs))
        return self.emb_dropout(x)

    def encode(self, seqs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        item_emb = self.items(seqs) if item_emb is None else item_emb
        return self.encoder(self.embed(item_emb, seqs), seqs)
