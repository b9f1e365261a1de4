"""The next-item objectives against their formulas, and every backbone training under each."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmemb_dist.config import RatConfig
from llmemb_dist.srs import build_model
from llmemb_dist.srs.losses import Objective, full_softmax_loss, sampled_softmax_loss

NUM_ITEMS = 30


def test_full_softmax_is_cross_entropy_over_the_catalog_without_padding():
    torch.manual_seed(0)
    hidden, table = torch.randn(5, 4), torch.randn(NUM_ITEMS + 1, 4)
    pos = torch.tensor([1, 7, 30, 2, 7])
    expected = F.cross_entropy((hidden @ table[1:].T), pos - 1)  # classes are items 1..N
    assert torch.isclose(full_softmax_loss(hidden, table, pos), expected, atol=1e-6)


def test_sampled_softmax_subtracts_log_q_and_masks_accidental_hits():
    torch.manual_seed(0)
    hidden, pos_emb, neg_emb = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    pos, neg = torch.tensor([2, 4, 9]), torch.tensor([4, 5, 6, 7, 8])  # item 4 is row 1's own target
    log_q_pos, log_q_neg = torch.log(torch.tensor([0.1, 0.2, 0.3])), torch.log(torch.tensor([0.2, 0.5, 0.5, 0.5, 0.05]))
    logits = torch.cat([(hidden * pos_emb).sum(-1, keepdim=True) - log_q_pos[:, None], hidden @ neg_emb.T - log_q_neg], 1)
    logits[1, 1] = -math.inf
    expected = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    got = sampled_softmax_loss(hidden, pos, pos_emb, neg, neg_emb, log_q_pos, log_q_neg)
    assert torch.isclose(got, expected, atol=1e-6)
    # Raising one negative's sampling probability by a factor e lowers its logit by exactly 1.
    shifted = log_q_neg.clone()
    shifted[2] += 1.0
    logits[:, 3] -= 1.0
    assert torch.isclose(sampled_softmax_loss(hidden, pos, pos_emb, neg, neg_emb, log_q_pos, shifted),
                         F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)), atol=1e-6)


def test_log_q_is_the_expected_count_of_in_batch_and_uniform_proposals():
    popularity = np.zeros(NUM_ITEMS + 1)
    popularity[1], popularity[2] = 30, 10  # shares 0.75 and 0.25; other items are never a target
    objective = Objective("sampled_softmax", NUM_ITEMS, num_negatives=6, popularity=popularity)
    log_q = objective.log_q(torch.tensor([1, 2, 3]), batch_targets=4)
    expected = [1 - 0.25 ** 4 + 6 / NUM_ITEMS, 1 - 0.75 ** 4 + 6 / NUM_ITEMS, 6 / NUM_ITEMS]
    assert torch.allclose(log_q, torch.log(torch.tensor(expected)), atol=1e-6)
    neg = objective.negatives(torch.tensor([2, 2, 5]), torch.Generator().manual_seed(0))
    assert neg[:2].tolist() == [2, 5] and len(neg) == 2 + 6  # the batch's distinct targets, then uniform draws
    assert Objective("ce", NUM_ITEMS).negatives(torch.tensor([1]), None) is None


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
@pytest.mark.parametrize("kind", ["bce", "ce", "sampled_softmax"])
@pytest.mark.parametrize("item_repr", ["id", "llm"])
def test_every_backbone_trains_under_every_objective(backbone, kind, item_repr):
    torch.manual_seed(0)
    cfg = RatConfig(hidden=8, layers=1, heads=1, dropout=0.0, max_len=10, adapter_hidden=12)
    llm = np.random.default_rng(0).normal(size=(NUM_ITEMS, 6)).astype(np.float32)
    model = build_model(cfg, backbone, item_repr, NUM_ITEMS, llm).train()
    objective = Objective(kind, NUM_ITEMS, num_negatives=5, popularity=np.arange(NUM_ITEMS + 1))
    seqs = torch.tensor([[0, 0, 3, 7, 9], [1, 2, 3, 4, 5]])
    loss, targets, target_emb = model.rec_loss(seqs, torch.Generator().manual_seed(0), objective)
    loss.backward()
    assert torch.isfinite(loss) and len(targets) > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    assert torch.allclose(target_emb, model.items(targets), atol=1e-5)
