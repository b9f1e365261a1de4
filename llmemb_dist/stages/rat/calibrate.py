"""How far a new item's text side is scaled so that it is recommended about as often as a trained item like it.

A representation that adds a free ID vector to the text side (llm_gate, llm_id) places a new item by its
text side alone, against trained items that carry both: the trained ones' scores spread wider, and a new
item then almost never reaches a top-k list even when its text fits the user (bench/results/quality.md,
cold start). The scale is found on the validation users, without their labels: a seeded sample of the
trained items (drawn like new items, whose popularity is not known yet) plays new, text side only and
scaled, and the scale chosen is the one at which those items fill as many top-k slots as they do with
the vectors they trained (times `rat.new_item_exposure`). New items are then recommended about as often as
trained items of their kind; for `llm`, whose items are their text side, the scale is 1.
Every score is the model's as it serves: with its text channel on, a new item is its scaled text side plus
its text, and the channel's part, which the scale leaves alone, is in the calibration too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmemb_dist.config import RatConfig
from llmemb_dist.data.sequences import Ragged, Sequences, pad_left
from llmemb_dist.srs import SeqRecommender
from llmemb_dist.srs.placement import NEW_ITEM_SCALE, ItemPlacement
from llmemb_dist.stages.rat.evaluate import leave_out_seen

PSEUDO_NEW_FRACTION = 0.1  # of the trained items
MAX_SCALE = 4.0
STEPS = 12  # bisection steps: the scale to within (MAX_SCALE - 1) / 2**12


@dataclass
class ValidationScores:
    """Per validation user (their inputs left out, as in full ranking), as the model scores with its text
    channel: the k best scores among the items not in `items`, the k best of `items` with their trained
    vectors, and what `items` score placed as new at a scale (`placed_as_new`)."""

    best: torch.Tensor
    trained: torch.Tensor
    users: torch.Tensor  # the users' vectors, the text channel's columns last
    text_side: torch.Tensor  # (len(items), hidden), what the scale multiplies
    text: torch.Tensor  # (len(items), text columns): the channel's, which the scale leaves alone
    seen: Ragged  # per user, the columns of `items` among their inputs
    k: int

    def placed_as_new(self, scale: float, batch_size: int = 512) -> torch.Tensor:
        """Each user's k best scores of `items` placed as new with their text side scaled by `scale`.

        The channel's part of a score does not scale, so the order among `items` changes with the scale and
        the k best are found again for each: memory grows with a batch of users times `items`, not with
        all users."""
        hidden, out = self.text_side.shape[1], []
        for start in range(0, len(self.users), batch_size):
            users = self.users[start: start + batch_size]
            scores = scale * (users[:, :hidden] @ self.text_side.T)
            if self.text.shape[1]:
                scores += users[:, hidden:] @ self.text.T
            seen = self.seen.take(np.arange(start, start + len(users)))
            scores[torch.from_numpy(seen.row_index()), torch.from_numpy(seen.values)] = -torch.inf
            out.append(scores.topk(min(self.k, scores.shape[1]), dim=1).values)
        return torch.cat(out)


@torch.no_grad()
def validation_scores(model: SeqRecommender, table: torch.Tensor, data: Sequences, items: np.ndarray,
                      text_side: torch.Tensor, max_len: int, k: int, batch_size: int = 512) -> ValidationScores:
    """What `new_item_scale` weighs, for the validation users; `items` are sorted item indices."""
    inputs, _ = data.split("valid")
    chosen = torch.zeros(len(table), dtype=torch.bool)
    chosen[torch.as_tensor(items)] = True
    column = torch.full((len(table),), -1, dtype=torch.long)
    column[torch.as_tensor(items)] = torch.arange(len(items))
    vectors = model.item_vectors(table).float()
    text = vectors[torch.as_tensor(items), table.shape[1]:]  # empty without the channel
    best, trained, users_all = [], [], []
    kept = min(k, len(items))  # per user, of `items`
    for start in range(0, len(inputs), batch_size):
        batch = inputs.take(np.arange(start, min(start + batch_size, len(inputs))))
        users = model.user_vectors(torch.as_tensor(pad_left(batch, max_len))).float()
        scores = users @ vectors.T
        leave_out_seen(scores, batch)
        trained.append(scores[:, chosen].topk(kept, dim=1).values)
        best.append(scores.masked_fill(chosen, -torch.inf).topk(k, dim=1).values)
        users_all.append(users)
    cols = column[torch.from_numpy(inputs.values)].numpy()
    mine = cols >= 0
    per_user = np.bincount(inputs.row_index()[mine], minlength=len(inputs))
    seen = Ragged.from_lengths(cols[mine], per_user)
    return ValidationScores(torch.cat(best), torch.cat(trained), torch.cat(users_all), text_side, text, seen, k)


def shown(best: torch.Tensor, scores: torch.Tensor, k: int) -> int:
    """How many top-k slots the items of `scores` take beside the others' k best."""
    return int((torch.cat([best, scores], dim=1).topk(k, dim=1).indices >= best.shape[1]).sum())


@torch.no_grad()
def new_item_scale(model: SeqRecommender, placement: ItemPlacement, data: Sequences, llm: np.ndarray, max_len: int,
                   exposure: float, seed: int, k: int = 10) -> float:
    """The scale of a new item's text side (see the module's docstring); `llm` row k - 1 is item k's raw vector.
    Scores are the model's as it serves, its text channel at its chosen weight included."""
    model.eval()
    rng = np.random.default_rng(seed)
    pseudo_new = np.sort(rng.choice(np.arange(1, data.num_items + 1), replace=False,
                                    size=max(1, int(PSEUDO_NEW_FRACTION * data.num_items))))
    text_side = placement.items.with_llm(torch.as_tensor(llm[pseudo_new - 1], dtype=torch.float32),
                                         torch.zeros(len(pseudo_new), dtype=torch.long)).float()
    scores = validation_scores(model, model.items.table().detach().float(), data, pseudo_new, text_side, max_len, k)
    target = exposure * shown(scores.best, scores.trained, k)
    if shown(scores.best, scores.placed_as_new(1.0), k) >= target:
        return 1.0
    low, high = 1.0, MAX_SCALE
    for _ in range(STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if shown(scores.best, scores.placed_as_new(middle), k) < target else (low, middle)
    return high


def calibrated_placement(model: SeqRecommender, spec: dict, data: Sequences, text_hashes: list[str],
                         llm: np.ndarray | None, rcfg: RatConfig) -> ItemPlacement:
    """The trained items placed as RAT publishes them; with an LLM side, a new item's scale calibrated too."""
    with torch.no_grad():
        placement = ItemPlacement(model.items, spec, data.item_ids, text_hashes, model.items.table())
    if llm is not None:
        placement.spec[NEW_ITEM_SCALE] = new_item_scale(model, placement, data, llm, rcfg.max_len,
                                                        rcfg.new_item_exposure, rcfg.seed)
    return placement
