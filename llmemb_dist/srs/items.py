"""Item representations: learned IDs (the baseline) or frozen LLM embeddings through a trainable adapter (LLMEmb).

Row k of every table is item k and row 0 is padding; the reference puts the LLM
table's zero row at the end for SASRec and GRU4Rec, shifting every item by one.

Every representation also says, through `with_llm(raw, index)`, what vector an item gets from its
raw LLM vector: index k > 0 for the trained item k whose text has changed, 0 for an item nobody
interacted with. The adapt stage carries new items into the recommender's space with it.
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

    def with_llm(self, raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if bool((index == 0).any()):
            raise ValueError("item_repr 'id' cannot place an item without interactions: it has no text side")
        return self.emb.weight[index]


class FixedItems(nn.Module):
    """A given table of item vectors (row 0 padding): what a trained recommender serves from."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("vectors", table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vectors[ids]

    def table(self) -> torch.Tensor:
        return self.vectors


def standardization(llm: np.ndarray) -> tuple[np.ndarray, float]:
    """The mean and the scale `standardize` applies: a new item is standardised with the trained table's."""
    llm = np.asarray(llm, dtype=np.float32)
    mean = llm.mean(0)
    return mean, max(float(np.linalg.norm(llm - mean, axis=1).mean()), 1e-12)


def standardize(llm: np.ndarray) -> np.ndarray:
    """Centred, and scaled to mean row norm 1: LLM embeddings come at any scale (a 7B model's are large),
    and the adapter then starts in the same regime for every model. Directions between items are kept."""
    mean, scale = standardization(llm)
    return (np.asarray(llm, dtype=np.float32) - mean) / scale


class Standardized(nn.Module):
    """The trained table's standardisation, saved with the model (a new item needs the same one)."""

    def __init__(self, llm: np.ndarray):
        super().__init__()
        mean, scale = standardization(llm)
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.scale


class LlmItems(nn.Module):
    """Frozen LLM item embeddings, Linear(d, adapter_hidden) -> Linear(adapter_hidden, hidden) as the reference."""

    def __init__(self, llm: np.ndarray, hidden: int, adapter_hidden: int):
        super().__init__()
        table = torch.zeros(llm.shape[0] + 1, llm.shape[1])
        table[1:] = torch.from_numpy(standardize(llm))
        # A buffer, not a parameter: frozen. Not saved: it is the embeddings publication itself.
        self.register_buffer("llm", table, persistent=False)
        self.standardized = Standardized(llm)
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

    def with_llm(self, raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.adapt(self.standardized(raw))


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

    def with_llm(self, raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.llm.with_llm(raw, index) + self.ids.weight[index]  # row 0 (no interactions) stays zero


class FrozenLlmItems(nn.Module):
    """The no-adapter ablation (item_repr 'llm_frozen'): the standardised LLM table reduced to `hidden`
    dimensions by PCA once, then frozen. No item parameter is trained, so what the recommender gets
    from items is what the LLM put in them."""

    def __init__(self, llm: np.ndarray, hidden: int):
        super().__init__()
        centred, components = projection(llm, hidden, "llm_frozen")
        table = torch.zeros(llm.shape[0] + 1, hidden)
        table[1:] = torch.from_numpy(centred @ components.T)
        self.register_buffer("frozen", table, persistent=False)
        self.standardized = Standardized(llm)
        self.register_buffer("components", torch.from_numpy(components.astype(np.float32)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.frozen[ids]

    def table(self) -> torch.Tensor:
        return self.frozen

    def with_llm(self, raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.standardized(raw) @ self.components.T


def projection(llm: np.ndarray, hidden: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The standardised table and its top `hidden` principal directions (rows, signs fixed for reproducibility)."""
    if min(llm.shape) < hidden:
        raise ValueError(f"item_repr {kind!r} needs at least rat.hidden={hidden} items and LLM dimensions, "
                         f"the embeddings are {llm.shape[0]} x {llm.shape[1]}")
    centred = standardize(llm)
    components = np.linalg.svd(centred, full_matrices=False)[2][:hidden]
    return centred, components * np.sign(components[np.arange(hidden), np.abs(components).argmax(1)])[:, None]


class LlmInitIdItems(IdItems):
    """Free ID vectors initialised from the LLM table (item_repr 'id_llm_init'), as LLM-ESR and LLMInit do.

    Each item starts at the PCA projection of its standardised LLM vector, scaled to the size of
    the ID baseline's initial vectors, and then trains like an ID: the text gives every item a
    starting place that already puts similar items together, and interactions move it from there.
    An item without interactions keeps its start, so the projection is kept for items that arrive
    later (the adapt stage).
    """

    def __init__(self, llm: np.ndarray, num_items: int, hidden: int):
        super().__init__(num_items, hidden)
        centred, components = projection(llm, hidden, "id_llm_init")
        start = centred @ components.T
        # The baseline's xavier_normal_ start on a (num_items + 1, hidden) table has this mean row norm.
        id_norm = np.sqrt(hidden * 2.0 / (num_items + 1 + hidden))
        self.scale = float(id_norm / max(np.linalg.norm(start, axis=1).mean(), 1e-12))
        with torch.no_grad():
            self.emb.weight[1:] = torch.from_numpy(start * self.scale)
        self.standardized = Standardized(llm)
        # The projection that placed every item at its start, for items that arrive later.
        self.register_buffer("components", torch.from_numpy((components * self.scale).astype(np.float32)))

    def with_llm(self, raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        start = self.standardized(raw) @ self.components.T
        return torch.where((index > 0)[:, None], self.emb.weight[index], start)


class GatedLlmIdItems(nn.Module):
    """The adapted LLM vector plus an ID vector weighted by a learned gate of the item's training
    popularity (item_repr 'llm_gate'): g(k) = sigmoid(w * log(1 + count_k) + b).

    Like 'llm_id' the ID side starts at zero, so training starts from LLMEmb; the gate decides per
    popularity how far an item may move off its text, so rarely seen items, whose ID vectors see
    few gradients and overfit them, lean on the shared adapter, and popular ones on their IDs.
    An item with no interactions has count 0 and its ID side at zero: exactly its adapted LLM vector.

    With `id_dropout` p, training drops each item's ID side with probability p wherever the item appears
    (as DropoutNet drops preference inputs): the LLM side alone must then rank an item too, which is
    what it does for items that arrive after training.
    """

    def __init__(self, llm: np.ndarray, num_items: int, hidden: int, adapter_hidden: int,
                 popularity: np.ndarray | None, id_dropout: float = 0.0):
        super().__init__()
        self.id_dropout = id_dropout
        self.llm = LlmItems(llm, hidden, adapter_hidden)
        self.ids = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        nn.init.zeros_(self.ids.weight)
        counts = np.zeros(num_items + 1) if popularity is None else np.asarray(popularity, dtype=np.float64)
        # Saved with the model: the gate of each trained item is part of what it learned.
        self.register_buffer("log_count", torch.log1p(torch.as_tensor(counts, dtype=torch.float32)))
        self.gate_weight = nn.Parameter(torch.tensor(1.0))
        self.gate_bias = nn.Parameter(torch.tensor(-2.0))

    def gate(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate_weight * self.log_count[ids] + self.gate_bias)[..., None]

    def id_side(self, ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        side = self.gate(ids) * vectors
        if self.training and self.id_dropout > 0:
            side = side * (torch.rand(ids.shape, device=side.device) >= self.id_dropout)[..., None]
        return side

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm(ids) + self.id_side(ids, self.ids(ids))

    def table(self) -> torch.Tensor:
        every = torch.arange(len(self.log_count), device=self.log_count.device)
        return self.llm.table() + self.id_side(every, self.ids.weight)

    def with_llm(self, raw: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.llm.with_llm(raw, index) + self.gate(index) * self.ids.weight[index]


def build_items(kind: str, num_items: int, hidden: int, adapter_hidden: int, llm: np.ndarray | None,
                popularity: np.ndarray | None = None, id_dropout: float = 0.0) -> nn.Module:
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
    if kind == "id_llm_init":
        return LlmInitIdItems(llm, num_items, hidden)
    if kind == "llm_gate":
        return GatedLlmIdItems(llm, num_items, hidden, adapter_hidden, popularity, id_dropout)
    raise ValueError(f"unknown item_repr {kind!r}")
