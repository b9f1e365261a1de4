"""Item representations: learned IDs (the baseline) or frozen LLM embeddings through a trainable adapter (LLMEmb).

Row k of every table is item k and row 0 is padding; the reference puts the LLM
table's zero row at the end for SASRec and GRU4Rec, shifting every item by one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class IdItems(nn.Module):
    def __init__(self, num_items: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        nn.init.xavier_normal_(self.emb.weight)
        with torch.no_grad():
            self.emb.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)

    def table(self) -> torch.Tensor:
        """Every item's representation, (num_items + 1, hidden)."""
        return self.emb.weight


def standardize(llm: np.ndarray) -> np.ndarray:
    """Centred, and scaled to mean row norm 1: LLM embeddings come at any scale (a 7B model's are large),
    and the adapter then starts in the same regime for every model. Directions between items are kept."""
    llm = np.asarray(llm, dtype=np.float32)
    centred = llm - llm.mean(0)
    return centred / max(float(np.linalg.norm(centred, axis=1).mean()), 1e-12)


class LlmItems(nn.Module):
    """Frozen LLM item embeddings, Linear(d, adapter_hidden) -> Linear(adapter_hidden, hidden) as the reference."""

    def __init__(self, llm: np.ndarray, hidden: int, adapter_hidden: int):
        super().__init__()
        table = torch.zeros(llm.shape[0] + 1, llm.shape[1])
        table[1:] = torch.from_numpy(standardize(llm))
        # A buffer, not a parameter: frozen. Not saved: it is the embeddings publication itself.
        self.register_buffer("llm", table, persistent=False)
        self.adapter = nn.Sequential(nn.Linear(llm.shape[1], adapter_hidden), nn.Linear(adapter_hidden, hidden))
        for layer in self.adapter:
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def adapt(self, llm: torch.Tensor) -> torch.Tensor:
        """The adapter. It has no nonlinearity between its layers (as the reference), so one composed
        matrix per call is the same function with the same gradients at a fraction of the multiply-adds."""
        first, second = self.adapter
        return F.linear(llm, second.weight @ first.weight, second.weight @ first.bias + second.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # A batch repeats items (every position, positives and negatives): adapt each distinct one once.
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.adapt(self.llm[unique])[inverse]

    def table(self) -> torch.Tensor:
        out = self.adapt(self.llm)
        return torch.cat([torch.zeros_like(out[:1]), out[1:]])


class LlmIdItems(nn.Module):
    """The adapted LLM vector plus a trainable ID vector that starts at zero (item_repr 'llm_id').

    The LLM side is shared by all items, so it carries what text says about rarely seen (tail)
    items; the ID side gets gradient in proportion to an item's interactions, so it grows where
    data supports it and lets popular (head) items move off their text to their collaborative place.
    """

    def __init__(self, llm: np.ndarray, num_items: int, hidden: int, adapter_hidden: int):
        super().__init__()
        self.llm = LlmItems(llm, hidden, adapter_hidden)
        self.ids = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        nn.init.zeros_(self.ids.weight)  # at zero every item starts exactly as LLMEmb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm(ids) + self.ids(ids)

    def table(self) -> torch.Tensor:
        return self.llm.table() + self.ids.weight


class FrozenLlmItems(nn.Module):
    """The no-adapter ablation (item_repr 'llm_frozen'): the standardised LLM table reduced to `hidden`
    dimensions by PCA once, then frozen. No item parameter is trained, so what the recommender gets
    from items is what the LLM put in them."""

    def __init__(self, llm: np.ndarray, hidden: int):
        super().__init__()
        if min(llm.shape) < hidden:
            raise ValueError(f"item_repr 'llm_frozen' needs at least rat.hidden={hidden} items and LLM dimensions, "
                             f"the embeddings are {llm.shape[0]} x {llm.shape[1]}")
        centred = standardize(llm)
        components = np.linalg.svd(centred, full_matrices=False)[2][:hidden]
        table = torch.zeros(llm.shape[0] + 1, hidden)
        table[1:] = torch.from_numpy(centred @ components.T)
        self.register_buffer("frozen", table, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.frozen[ids]

    def table(self) -> torch.Tensor:
        return self.frozen


def build_items(kind: str, num_items: int, hidden: int, adapter_hidden: int, llm: np.ndarray | None) -> nn.Module:
    if kind == "id":
        return IdItems(num_items, hidden)
    if llm is None:
        raise ValueError(f"item_repr {kind!r} needs the LLM embedding table")
    if kind == "llm":
        return LlmItems(llm, hidden, adapter_hidden)
    if kind == "llm_id":
        return LlmIdItems(llm, num_items, hidden, adapter_hidden)
    if kind == "llm_frozen":
        return FrozenLlmItems(llm, hidden)
    raise ValueError(f"unknown item_repr {kind!r}")
