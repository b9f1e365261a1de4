"""The new-item scale: items that play new fill the top-10 slots they filled trained, and the placement
applies the scale to new items only."""
import numpy as np
import torch

from llmemb_dist.config import RatConfig
from llmemb_dist.data.sequences import Sequences
from llmemb_dist.srs import build_model
from llmemb_dist.srs.placement import NEW_ITEM_SCALE, ItemPlacement
from llmemb_dist.stages.rat.calibrate import new_item_scale, shown, validation_scores

NUM_ITEMS, HIDDEN = 60, 16
CFG = RatConfig(hidden=HIDDEN, layers=1, heads=1, dropout=0.0, max_len=10, adapter_hidden=24)


def setup(item_repr):
    rng = np.random.default_rng(0)
    data = Sequences([f"i{k}" for k in range(1, NUM_ITEMS + 1)], [f"u{u}" for u in range(80)],
                     [rng.integers(1, NUM_ITEMS + 1, size=rng.integers(4, 10)) for _ in range(80)])
    llm = rng.normal(size=(NUM_ITEMS, 8)).astype(np.float32)
    torch.manual_seed(0)
    model = build_model(CFG, "sasrec", item_repr, NUM_ITEMS, llm, data.train_popularity()).eval()
    if item_repr == "llm_gate":
        with torch.no_grad():  # trained ID sides: every item's score spreads wider than its text side's
            model.items.ids.weight[1:] = torch.randn(NUM_ITEMS, HIDDEN)
    with torch.no_grad():
        placement = ItemPlacement(model.items, {"item_repr": item_repr}, data.item_ids, [""] * NUM_ITEMS,
                                  model.items.table())
    return model, placement, data, llm


def test_items_that_are_their_text_side_need_no_scale():
    model, placement, data, llm = setup("llm")
    assert new_item_scale(model, placement, data, llm, CFG.max_len, 1.0, seed=1) == 1.0


def test_the_scale_gives_pseudo_new_items_the_slots_they_had_trained():
    model, placement, data, llm = setup("llm_gate")
    scale = new_item_scale(model, placement, data, llm, CFG.max_len, 1.0, seed=1)
    assert scale > 1.0
    # The same pseudo-new items the function drew, checked by hand at the scale and just below it.
    items = np.sort(np.random.default_rng(1).choice(np.arange(1, NUM_ITEMS + 1), replace=False, size=NUM_ITEMS // 10))
    text = placement.items.with_llm(torch.from_numpy(llm[items - 1]), torch.zeros(len(items), dtype=torch.long))
    with torch.no_grad():
        best, trained, text_scores = validation_scores(model, model.items.table().float(), data, items, text.float(),
                                                       CFG.max_len, k=10)
    target = shown(best, trained, 10)
    assert shown(best, scale * text_scores, 10) >= target > shown(best, (scale - 0.01) * text_scores, 10)
    assert new_item_scale(model, placement, data, llm, CFG.max_len, 0.0, seed=1) == 1.0  # exposure 0: unscaled


def test_the_placement_scales_new_items_only():
    _, placement, data, llm = setup("llm_gate")
    ids = data.item_ids[:3] + ["new-1", "new-2"]
    raw = np.concatenate([llm[:3], llm[3:5]])
    before = placement.vectors(ids, ["", "", "", "", ""], raw)
    placement.spec[NEW_ITEM_SCALE] = 1.5
    after = placement.vectors(ids, ["", "", "", "", ""], raw)
    assert np.array_equal(after[:3], before[:3]) and np.allclose(after[3:], 1.5 * before[3:], atol=1e-6)


def test_k_scores_per_user_decide_the_slots_at_every_scale():
    """validation_scores keeps each user's k best pseudo-new scores, not all of them (users x items would not
    fit in memory at catalog scale): the slots counted must be the same at any scale."""
    g = torch.Generator().manual_seed(0)
    best = torch.randn(50, 10, generator=g)
    scores = torch.randn(50, 40, generator=g)
    scores[scores < -1.5] = -torch.inf  # the user's own inputs, left out
    for scale in (0.5, 1.0, 1.7, 3.0):
        assert shown(best, scale * scores, 10) == shown(best, scale * scores.topk(10, dim=1).values, 10)
