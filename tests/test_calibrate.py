"""The new-item scale: items that play new fill the top-10 slots they filled trained, and the placement
applies the scale to new items only."""
import numpy as np
import pytest
import torch

from llmemb_dist.config import RatConfig
from llmemb_dist.data.sequences import Sequences, pad_left
from llmemb_dist.srs import build_model
from llmemb_dist.srs.placement import NEW_ITEM_SCALE, ItemPlacement
from llmemb_dist.stages.rat.calibrate import new_item_scale, shown, validation_scores
from llmemb_dist.stages.rat.evaluate import leave_out_seen

NUM_ITEMS, HIDDEN = 60, 16
CFG = RatConfig(hidden=HIDDEN, layers=1, heads=1, dropout=0.0, max_len=10, adapter_hidden=24)


def setup(item_repr):
    rng = np.random.default_rng(0)
    data = Sequences.from_rows([f"i{k}" for k in range(1, NUM_ITEMS + 1)], [f"u{u}" for u in range(80)],
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


def pseudo_new(placement, llm):
    """The pseudo-new items new_item_scale draws with seed 1, and their text sides."""
    items = np.sort(np.random.default_rng(1).choice(np.arange(1, NUM_ITEMS + 1), replace=False, size=NUM_ITEMS // 10))
    with torch.no_grad():
        text = placement.items.with_llm(torch.from_numpy(llm[items - 1]), torch.zeros(len(items), dtype=torch.long))
    return items, text.float()


@pytest.mark.parametrize("text_weight", [0.0, 4.0])
def test_the_scale_gives_pseudo_new_items_the_slots_they_had_trained(text_weight):
    model, placement, data, llm = setup("llm_gate")
    model.text_weight = text_weight
    scale = new_item_scale(model, placement, data, llm, CFG.max_len, 1.0, seed=1)
    assert scale > 1.0
    # The same pseudo-new items the function drew, checked by hand at the scale and just below it.
    items, text = pseudo_new(placement, llm)
    with torch.no_grad():
        scores = validation_scores(model, model.items.table().float(), data, items, text, CFG.max_len, k=10)
    target = shown(scores.best, scores.trained, 10)
    assert shown(scores.best, scores.placed_as_new(scale), 10) >= target > shown(scores.best, scores.placed_as_new(scale - 0.01), 10)
    assert new_item_scale(model, placement, data, llm, CFG.max_len, 0.0, seed=1) == 1.0  # exposure 0: unscaled


def test_new_items_are_scored_with_the_text_channel_as_the_model_serves_them():
    """Placed as new, an item scores what the model gives a table whose row is its scaled text side, the text
    channel (which the scale leaves alone) included."""
    model, placement, data, llm = setup("llm_gate")
    model.text_weight = 4.0
    items, text = pseudo_new(placement, llm)
    inputs, _ = data.split("valid")
    with torch.no_grad():
        scores = validation_scores(model, model.items.table().float(), data, items, text, CFG.max_len, k=10)
        for scale in (1.0, 2.5):
            table = model.items.table().float().clone()
            table[torch.as_tensor(items)] = scale * text
            full = model.user_vectors(torch.as_tensor(pad_left(inputs, CFG.max_len))) @ model.item_vectors(table).T
            leave_out_seen(full, inputs)
            expected = full[:, torch.as_tensor(items)].topk(6, dim=1).values
            assert torch.allclose(scores.placed_as_new(scale), expected, atol=1e-5)
            assert torch.allclose(scores.placed_as_new(scale, batch_size=7), expected, atol=1e-5)
        # Without the channel the scores would be others: the channel is in them.
        model.text_weight = 0.0
        plain = validation_scores(model, model.items.table().float(), data, items, text, CFG.max_len, k=10)
        assert not torch.allclose(plain.placed_as_new(1.0), scores.placed_as_new(1.0), atol=1e-3)


def test_the_placement_scales_new_items_only():
    _, placement, data, llm = setup("llm_gate")
    ids = data.item_ids[:3] + ["new-1", "new-2"]
    raw = np.concatenate([llm[:3], llm[3:5]])
    before = placement.vectors(ids, ["", "", "", "", ""], raw)
    placement.spec[NEW_ITEM_SCALE] = 1.5
    after = placement.vectors(ids, ["", "", "", "", ""], raw)
    assert np.array_equal(after[:3], before[:3]) and np.allclose(after[3:], 1.5 * before[3:], atol=1e-6)
