"""What the three backbones share: item lookup, reverse positions, next-item training, scoring."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmemb_dist.srs.items import FixedItems
from llmemb_dist.srs.losses import Objective


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


def unit_text_table(llm: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Each item's LLM vector at unit length, row k for item k (row k - 1 of `llm`), row 0 padding: a dot
    product of two rows is their cosine."""
    table = torch.zeros(len(llm) + 1, llm.shape[1])
    table[1:] = F.normalize(torch.from_numpy(np.array(llm, dtype=np.float32)), dim=1)  # a copy: Ray's are read-only
    return table


class SeqRecommender(nn.Module):
    """A backbone over an item representation; subclasses define `encode` (B, L) -> (B, L, hidden).

    With a text channel (`attach_text`) and a nonzero `text_weight`, a user scores item j as well by the
    cosine of j's LLM vector to the LLM vector of the user's last item, times `text_weight`: the backbone
    learns what sequences say, and this term keeps what the text of the last item says about the next one
    at full resolution, which the adapter's projection to `hidden` dimensions blurs and which rarely seen
    items need most. Training leaves the weight at 0; RAT chooses it on validation afterwards (`fit`).
    """

    def __init__(self, items: nn.Module, num_items: int):
        super().__init__()
        self.items = items
        self.num_items = num_items
        self.text_weight = 0.0
        # Not a buffer: DDP would broadcast it every step, and it is not saved (it is the embeddings publication).
        self.text: torch.Tensor | None = None

    def attach_text(self, llm: np.ndarray | torch.Tensor) -> None:
        """The text channel over `llm` (row k - 1 for item k; it may go on past the trained items, to items
        scored as new)."""
        self.text = unit_text_table(llm)

    def encode(self, seqs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs at every position; `item_emb` (B, L, hidden) is self.items(seqs) when the caller has it."""
        raise NotImplementedError

    def rec_loss(self, seqs: torch.Tensor, generator: torch.Generator | None = None,
                 objective: Objective | None = None) -> tuple[torch.Tensor, ...]:
        """The next-item loss at every position of left-padded training sequences (the reference's BCE
        unless an objective is given).

        Returns (loss, target items, their representations): the alignment loss reuses them."""
        objective = objective or Objective("bce", self.num_items)
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        where = (inputs != 0) & (targets != 0)
        pos = targets[where]
        input_emb, pos_emb, neg, neg_emb = self.lookup(pos, objective, generator, inputs)
        hidden = self.encode(inputs, input_emb.view(*inputs.shape, -1))
        return objective(hidden[where], pos, pos_emb, neg, neg_emb), pos, pos_emb

    def lookup(self, pos: torch.Tensor, objective: Objective, generator: torch.Generator | None,
               inputs: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Representations of the inputs (when given), the targets and the objective's negatives, in one
        pass through the item representation (an LLM adapter then runs once per distinct item). With no
        negatives to draw (the full softmax) the negatives are the whole table."""
        neg = objective.negatives(pos, generator)
        if neg is None:
            table = self.items.table()
            return None if inputs is None else table[inputs], table[pos], None, table
        ids = [pos, neg] if inputs is None else [inputs.reshape(-1), pos, neg]
        emb = self.items(torch.cat(ids))
        n_in = 0 if inputs is None else inputs.numel()
        input_emb = None if inputs is None else emb[:n_in]
        return input_emb, emb[n_in: n_in + len(pos)], neg, emb[n_in + len(pos):]

    def over_items(self, table: torch.Tensor) -> None:
        """Serves the trained backbone over a fixed item table (row 0 padding), trained and new items alike."""
        self.items, self.num_items = FixedItems(table), len(table) - 1

    def user_repr(self, seqs: torch.Tensor) -> torch.Tensor:
        """The state after each (left-padded) input sequence, (B, hidden)."""
        return self.encode(seqs)[:, -1]

    def user_vectors(self, seqs: torch.Tensor) -> torch.Tensor:
        """What a user is scored with: `user_repr`, then the last item's text times `text_weight` when the
        text channel is on. A dot product with `item_vectors` is the score."""
        users = self.user_repr(seqs)
        if not self.text_weight:
            return users
        last = self.text.to(users.device)[seqs[:, -1]]  # inputs are left-padded
        return torch.cat([users, self.text_weight * last.to(users.dtype)], 1)

    def item_vectors(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """What items are scored with: `table` (default the item representation's), then, when the text
        channel is on, each item's text."""
        table = self.items.table() if table is None else table
        if not self.text_weight:
            return table
        return torch.cat([table, self.text[: len(table)].to(table.device, table.dtype)], 1)

    def scores(self, seqs: torch.Tensor) -> torch.Tensor:
        """Scores of every item index for each sequence, (B, num_items + 1); column 0 is padding."""
        return self.user_vectors(seqs) @ self.item_vectors().T
