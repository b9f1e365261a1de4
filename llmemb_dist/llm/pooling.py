"""Pooling token states into one vector per sequence."""
from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """`mean` over real tokens, or the `last` real token (right padding assumed)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if mode == "last":
        last = attention_mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last.clamp_min(0)]
    raise ValueError(f"model.pooling: unknown pooling {mode!r} (mean or last)")
