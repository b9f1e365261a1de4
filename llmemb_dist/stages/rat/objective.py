"""RAT's training objective: the next-item loss (`rat.loss`) plus alpha times alignment to collaborative vectors."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from llmemb_dist.config import ConfigError, RatConfig
from llmemb_dist.srs import SeqRecommender
from llmemb_dist.srs.losses import Objective, alignment_loss

GIB = 1 << 30


def check_objective_fits(rcfg: RatConfig, num_items: int) -> None:
    """The full softmax holds a logit per position and item: refused where one step's would pass the bound."""
    if rcfg.loss != "ce":
        return
    need = rcfg.batch_size * rcfg.max_len * (num_items + 1) * 4
    if need > rcfg.ce_max_logits_gib * GIB:
        raise ConfigError(
            f"rat.loss=ce over {num_items} items would hold {need / GIB:.2f} GiB of logits a step (rat.batch_size "
            f"{rcfg.batch_size} x rat.max_len {rcfg.max_len} x items, float32), more than rat.ce_max_logits_gib="
            f"{rcfg.ce_max_logits_gib:g}: use rat.loss=sampled_softmax, which fits any catalog, or a smaller batch")


class RatModule(nn.Module):
    """The training objective: recommendation loss, plus alpha * alignment of the batch's target items."""

    def __init__(self, model: SeqRecommender, rec: Objective, srs: np.ndarray | None, alpha: float, temperature: float):
        super().__init__()
        self.model, self.rec, self.alpha, self.temperature = model, rec, alpha, temperature
        # Collaborative embeddings are a frozen input, not part of the saved model; copied, since on a Ray worker
        # the array is a read-only view of Ray's object store.
        self.register_buffer("srs", None if srs is None else torch.tensor(srs, dtype=torch.float32), persistent=False)

    def forward(self, seqs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        loss, targets, target_emb = self.model.rec_loss(seqs, generator, self.rec)
        if self.srs is not None and self.alpha > 0:
            items, inverse = targets.unique(return_inverse=True)
            # Each distinct target's representation, taken from the recommendation loss's lookup, not recomputed.
            first = torch.full_like(items, len(targets)).scatter_reduce(
                0, inverse, torch.arange(len(targets), device=targets.device), "amin")
            loss = loss + self.alpha * alignment_loss(self.srs[items], target_emb[first], self.temperature)
        return loss
