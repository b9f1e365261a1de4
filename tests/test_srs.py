import numpy as np
import pytest
import torch

from llmemb_dist.config import RatConfig
from llmemb_dist.srs import build_model
from llmemb_dist.srs.placement import ItemPlacement
from llmemb_dist.srs.items import standardize
from llmemb_dist.srs.losses import alignment_loss

NUM_ITEMS = 50
CFG = RatConfig(hidden=16, layers=2, heads=2, dropout=0.0, max_len=20, adapter_hidden=24)


def llm_table(dim=8):
    return np.random.default_rng(0).normal(size=(NUM_ITEMS, dim)).astype(np.float32)


def model(backbone, item_repr="id", popularity=None):
    torch.manual_seed(0)
    return build_model(CFG, backbone, item_repr, NUM_ITEMS, llm_table(dim=CFG.hidden), popularity).eval()


def test_sasrec_is_causal():
    m = model("sasrec")
    seqs = torch.tensor([[0, 0, 3, 7, 9, 11, 4]])
    changed = seqs.clone()
    changed[0, 5] = 30  # the item at t + 1 = 5 changes
    a, b = m.encode(seqs), m.encode(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5], b[:, 5])


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
@pytest.mark.parametrize("item_repr", ["id", "llm", "llm_id", "llm_gate", "id_llm_init"])
def test_padding_width_does_not_change_the_prediction(backbone, item_repr):
    m = model(backbone, item_repr)
    short = torch.tensor([[3, 7, 9], [0, 5, 6]])
    wide = torch.cat([torch.zeros(2, 4, dtype=torch.long), short], dim=1)
    assert torch.allclose(m.user_repr(short), m.user_repr(wide), atol=1e-5)
    assert m.scores(short).shape == (2, NUM_ITEMS + 1)


def test_llm_row_k_is_item_k():
    llm = standardize(llm_table(dim=CFG.hidden))
    items = model("sasrec", "llm").items
    assert torch.equal(items.llm[0], torch.zeros(llm.shape[1]))  # padding
    for k in (1, 2, NUM_ITEMS):
        assert torch.equal(items.llm[k], torch.from_numpy(llm[k - 1]))
        assert torch.allclose(items(torch.tensor([k]))[0], items.adapter(torch.from_numpy(llm[k - 1])), atol=1e-6)
    assert torch.allclose(items.table()[1:], items.adapter(torch.from_numpy(llm)), atol=1e-5)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
def test_training_loss_is_finite_and_reaches_every_parameter(backbone):
    m = model(backbone, "llm").train()
    seqs = torch.tensor([[0, 0, 3, 7, 9], [1, 2, 3, 4, 5]])
    loss, targets, target_emb = m.rec_loss(seqs, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and len(targets) > 0
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    # The alignment loss reuses these: they must be the targets' own representations.
    m.eval()
    assert torch.allclose(target_emb, m.items(targets), atol=1e-5)


def test_composed_adapter_is_the_two_layers_in_value_and_gradient():
    items = model("sasrec", "llm").items
    x = torch.randn(5, items.llm.shape[1])
    items.adapt(x).square().sum().backward()
    composed = [p.grad.clone() for p in items.adapter.parameters()]
    items.zero_grad()
    items.adapter(x).square().sum().backward()
    assert torch.allclose(items.adapt(x), items.adapter(x), atol=1e-5)
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-5) for a, p in zip(composed, items.adapter.parameters()))


def test_alignment_loss_is_lowest_when_the_two_sides_agree():
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1) * 3
    aligned = alignment_loss(x, x, temperature=2.0)
    shuffled = alignment_loss(x, x[torch.randperm(8)], temperature=2.0)
    assert aligned < shuffled


def test_alignment_loss_is_the_mean_of_both_directions_cross_entropies():
    srs, llm = torch.randn(30, 8), torch.randn(30, 8)
    logits = srs @ llm.T / 2.0
    targets = torch.softmax((srs @ srs.T + llm @ llm.T) / 2 / 2.0, dim=-1)
    srs_side = torch.nn.functional.cross_entropy(logits, targets)
    llm_side = torch.nn.functional.cross_entropy(logits.T, targets.T)
    assert torch.isclose(alignment_loss(srs, llm, temperature=2.0), (srs_side + llm_side) / 2, rtol=1e-5)


def test_llm_id_starts_as_llmemb_and_learns_an_id_vector_per_seen_item():
    m = model("sasrec", "llm_id").train()
    items = m.items
    assert torch.equal(items.table(), items.llm.table())  # the ID side starts at zero
    seqs = torch.tensor([[0, 0, 3, 7, 9], [1, 2, 3, 4, 5]])
    loss, _, _ = m.rec_loss(seqs, torch.Generator().manual_seed(0))
    loss.backward()
    grad = items.ids.weight.grad
    assert torch.count_nonzero(grad[0]) == 0  # padding never moves
    assert all(torch.count_nonzero(grad[k]) > 0 for k in (1, 2, 3, 4, 7))  # every input item gets its own signal
    assert all(p.grad is not None for p in items.llm.adapter.parameters())
    with torch.no_grad():
        items.ids.weight[5] += 1.0
    assert torch.allclose(items(torch.tensor([5]))[0], items.llm(torch.tensor([5]))[0] + 1.0)
    assert torch.allclose(items.table()[5], items(torch.tensor([5]))[0], atol=1e-6)


def test_llm_frozen_is_a_pca_rotation_with_nothing_to_train():
    llm = np.random.default_rng(0).normal(size=(NUM_ITEMS, CFG.hidden)).astype(np.float32)
    m = build_model(CFG, "sasrec", "llm_frozen", NUM_ITEMS, llm)
    assert not list(m.items.parameters())  # the no-adapter ablation: item vectors are not trained
    table = m.items.table()
    assert torch.equal(table[0], torch.zeros(CFG.hidden))  # padding
    # With every component kept, PCA is a rotation: the items keep their dot products.
    centred = torch.from_numpy(standardize(llm))
    assert torch.allclose(table[1:] @ table[1:].T, centred @ centred.T, atol=1e-4)
    with pytest.raises(ValueError, match="llm_frozen"):
        build_model(CFG, "sasrec", "llm_frozen", NUM_ITEMS, llm_table(dim=8))


def test_dropout_keeps_the_expected_value_and_is_off_in_eval():
    from llmemb_dist.srs.base import Dropout

    drop = Dropout(0.5)
    x = torch.ones(200_000)
    out = drop(x)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert abs(out.mean().item() - 1.0) < 0.02
    drop.eval()
    assert torch.equal(drop(x), x)
    with pytest.raises(ValueError, match="rat.dropout"):
        Dropout(1.0)


def test_id_llm_init_starts_every_item_at_its_llm_projection_and_trains_it_freely():
    items = model("sasrec", "id_llm_init").items
    centred = standardize(llm_table(dim=CFG.hidden))
    table = items.table().detach()
    assert torch.equal(table[0], torch.zeros(CFG.hidden))  # padding
    # Row k is item k: its start is its own LLM vector's projection, at the ID baseline's scale.
    start = torch.from_numpy(centred) @ items.components.T  # the projection, at the ID baseline's scale
    assert torch.allclose(table[1:], start, atol=1e-5)
    # All components kept (hidden = LLM dimension): the start keeps the items' LLM similarities.
    assert torch.allclose(table[1:] @ table[1:].T, torch.from_numpy(centred @ centred.T) * items.scale**2, atol=1e-4)
    assert items.emb.weight.requires_grad


def test_llm_gate_leans_on_the_id_side_by_training_popularity():
    popularity = np.zeros(NUM_ITEMS + 1)
    popularity[1:] = np.arange(NUM_ITEMS)  # item 1 was never seen in training
    items = model("sasrec", "llm_gate", popularity).items
    with torch.no_grad():
        items.ids.weight[1:] = 1.0
    table = items.table()
    gate = torch.sigmoid(items.gate_weight * torch.log1p(torch.tensor(popularity, dtype=torch.float32)) + items.gate_bias)
    for k in (1, 2, NUM_ITEMS):  # row k is item k: its adapted LLM vector plus its gated ID vector
        assert torch.allclose(table[k], items.llm.table()[k] + gate[k] * 1.0, atol=1e-6)
        assert torch.allclose(items(torch.tensor([k]))[0], table[k], atol=1e-6)
    assert gate[NUM_ITEMS] > gate[2] > gate[1]
    assert "log_count" in items.state_dict()  # saved with the model, so a loaded model gates the same


def test_id_dropout_drops_whole_id_sides_in_training_only():
    import dataclasses

    popularity = np.arange(NUM_ITEMS + 1)
    torch.manual_seed(0)
    items = build_model(dataclasses.replace(CFG, id_dropout=0.5), "sasrec", "llm_gate", NUM_ITEMS,
                        llm_table(dim=CFG.hidden), popularity).items
    with torch.no_grad():
        items.ids.weight[1:] = 1.0
    text, full = items.llm.table(), items.eval().table()
    items.train()
    torch.manual_seed(1)
    dropped = items.table()
    # Each item has either its whole ID side or none of it; about half lose it.
    none = torch.isclose(dropped, text, atol=1e-6).all(1)[1:]
    whole = torch.isclose(dropped, full, atol=1e-6).all(1)[1:]
    assert bool((none | whole).all()) and 10 < int(none.sum()) < 40
    ids = torch.arange(1, NUM_ITEMS + 1)
    assert torch.allclose(items.eval()(ids), full[1:], atol=1e-6)  # evaluation keeps every ID side


@pytest.mark.parametrize("item_repr", ["llm", "llm_id", "llm_gate", "id_llm_init", "llm_frozen"])
def test_with_llm_gives_trained_items_their_row_and_new_items_their_text_side(item_repr):
    llm = llm_table(dim=CFG.hidden)
    m = model("sasrec", item_repr, np.arange(NUM_ITEMS + 1))
    items = m.items
    with torch.no_grad():  # trained ID sides, so that the text side alone would not do
        for name, p in items.named_parameters():
            if p.dim() == 2 and p.shape[0] == NUM_ITEMS + 1:
                p[1:] += 0.5
    raw = torch.from_numpy(llm)
    index = torch.arange(1, NUM_ITEMS + 1)
    # A trained item whose LLM vector is the one it trained with: its own row of the table.
    assert torch.allclose(items.with_llm(raw, index), items.table()[1:], atol=1e-5)
    # An item without interactions: the representation's text side, computed from the raw vector alone.
    new = items.with_llm(raw, torch.zeros(NUM_ITEMS, dtype=torch.long))
    text_only = {"llm": lambda: items.table()[1:], "llm_frozen": lambda: items.table()[1:],
                 "llm_id": lambda: items.llm.table()[1:],
                 "llm_gate": lambda: items.llm.table()[1:],
                 "id_llm_init": lambda: items.standardized(raw) @ items.components.T}[item_repr]()
    assert torch.allclose(new, text_only, atol=1e-5)


def test_id_cannot_place_an_item_without_interactions():
    with pytest.raises(ValueError, match="cannot place an item without interactions"):
        model("sasrec", "id").items.with_llm(torch.zeros(1, CFG.hidden), torch.zeros(1, dtype=torch.long))


def test_a_placement_of_id_items_saves_and_loads(tmp_path):
    items = model("sasrec", "id").items
    ids = [f"i{k}" for k in range(NUM_ITEMS)]
    with torch.no_grad():
        placement = ItemPlacement(items, {"item_repr": "id", "hidden": CFG.hidden, "adapter_hidden": 0, "llm_dim": 0},
                                  ids, ["h"] * NUM_ITEMS, items.table())
    placement.save(tmp_path)  # its published table must not share memory with the ID table
    loaded = ItemPlacement.load(tmp_path)
    assert torch.equal(loaded.published, items.table().detach())


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
def test_the_text_channel_adds_the_weighted_cosine_to_the_last_items_text(backbone):
    m = model(backbone, "llm_gate")
    llm = torch.from_numpy(llm_table(dim=CFG.hidden))
    seqs = torch.tensor([[0, 3, 7, 9], [5, 6, 2, 40]])
    plain = m.user_repr(seqs) @ m.items.table().T
    assert m.text is not None and m.text_weight == 0 and torch.allclose(m.scores(seqs), plain, atol=1e-5)
    m.text_weight = 2.5
    cosine = torch.nn.functional.cosine_similarity(llm[seqs[:, -1] - 1][:, None], llm[None], dim=-1)  # item k is row k - 1
    assert torch.allclose(m.scores(seqs)[:, 1:], plain[:, 1:] + 2.5 * cosine, atol=1e-5)
    assert torch.equal(m.text[0], torch.zeros(CFG.hidden))  # padding


def test_every_item_representation_given_llm_vectors_gets_a_text_channel_when_a_weight_is_offered():
    """ID-only too: the blend is a post-hoc term any model can have, so the baseline gets it as well."""
    llm = llm_table(dim=CFG.hidden)
    assert build_model(CFG, "sasrec", "llm", NUM_ITEMS, llm).text is not None
    assert build_model(CFG, "sasrec", "id", NUM_ITEMS, llm).text is not None
    assert build_model(CFG, "sasrec", "id", NUM_ITEMS).text is None
    off = RatConfig(hidden=16, layers=2, heads=2, max_len=20, adapter_hidden=24, text_weights=[0.0])
    assert build_model(off, "sasrec", "llm_gate", NUM_ITEMS, llm).text is None
