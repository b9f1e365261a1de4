"""How far a new item's text side is scaled so that it is recommended about as often as a trained item like it.

A representation that adds a free ID vector to the text side (llm_gate, llm_id) places a new item by its
text side alone, against trained items that carry both: the trained ones' scores spread wider, and a new
item then almost never reaches a top-k list even when its text fits the user (bench/results/quality.md,
cold start). The scale is found on the validation users, without their labels: a seeded sample of the
trained items (drawn like new items, whose popularity is not known yet) plays new, text side only and
scaled, and the scale chosen is the one at which those items fill as many top-k slots as they do with
the vectors they trained (times `rat.new_item_exposure`). New items are then recommended about as often as
trained items of their kind; for `llm`, whose items are their text side, the scale is 1.
"""
from __future__ import annotations

import numpy as np
import torch

from llmemb_dist.config import RatConfig
from llmemb_dist.data.sequences import Sequences, pad_left
from llmemb_dist.srs import SeqRecommender
from llmemb_dist.srs.placement import NEW_ITEM_SCALE, ItemPlacement
from llmemb_dist.stages.rat.evaluate import leave_out_seen

PSEUDO_NEW_FRACTION = 0.1  # of the trained items
MAX_SCALE = 4.0
STEPS = 12  # bisection steps: the scale to within (MAX_SCALE - 1) / 2**12


@torch.no_grad()
def validation_scores(model: SeqRecommender, table: torch.Tensor, data: Sequences, items: np.ndarray,
                      text_side: torch.Tensor, max_len: int, k: int, batch_size: int = 512):
    """Per validation user: the k best scores among the items not in `items` (their inputs left out, as in
    full ranking), and the k best of `items` with their trained vectors and with their text side alone.

    Only k of each can reach a top-k list, and scaling the text side keeps the order among `items`, so k
    scores per user decide every scale: memory grows with the users, not with users x items."""
    inputs, _ = data.split("valid")
    chosen = torch.zeros(len(table), dtype=torch.bool)
    chosen[torch.as_tensor(items)] = True
    best, trained, text = [], [], []
    kept = min(k, len(items))  # per user, of `items`
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start: start + batch_size]
        users = model.user_repr(torch.as_tensor(pad_left(batch, max_len))).float()
        scores = users @ table.T
        leave_out_seen(scores, batch)
        picked = scores[:, chosen]
        trained.append(picked.topk(kept, dim=1).values)
        text.append(torch.where(torch.isinf(picked), picked, users @ text_side.T).topk(kept, dim=1).values)
        best.append(scores.masked_fill(chosen, -torch.inf).topk(k, dim=1).values)
    return torch.cat(best), torch.cat(trained), torch.cat(text)


def shown(best: torch.Tensor, scores: torch.Tensor, k: int) -> int:
    """How many top-k slots the items of `scores` take beside the others' k best."""
    return int((torch.cat([best, scores], dim=1).topk(k, dim=1).indices >= best.shape[1]).sum())


@torch.no_grad()
def new_item_scale(model: SeqRecommender, placement: ItemPlacement, data: Sequences, llm: np.ndarray, max_len: int,
                   exposure: float, seed: int, k: int = 10) -> float:
    """The scale of a new item's text side (see the module's docstring); `llm` row k - 1 is item k's raw vector."""
    model.eval()
    rng = np.random.default_rng(seed)
    pseudo_new = np.sort(rng.choice(np.arange(1, data.num_items + 1), replace=False,
                                    size=max(1, int(PSEUDO_NEW_FRACTION * data.num_items))))
    text_side = placement.items.with_llm(torch.as_tensor(llm[pseudo_new - 1], dtype=torch.float32),
                                         torch.zeros(len(pseudo_new), dtype=torch.long)).float()
    best, trained, text = validation_scores(model, model.items.table().detach().float(), data, pseudo_new,
                                            text_side, max_len, k)
    target = exposure * shown(best, trained, k)
    if shown(best, text, k) >= target:
        return 1.0
    low, high = 1.0, MAX_SCALE
    for _ in range(STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if shown(best, middle * text, k) < target else (low, middle)
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
