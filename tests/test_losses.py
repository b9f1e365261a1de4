"""The contrastive losses and metrics against values computed by hand."""
import math

import pytest
import torch

from llmemb_dist.distributed.collective import gather_with_local_grad
from llmemb_dist.llm import losses


def test_info_nce_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalises to e1, e2
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # normalises to e1, (e1+e2)/√2
    t = torch.tensor(0.5)
    s = 1 / math.sqrt(2)
    # a·bᵀ/t = [[1, s], [0, s]] / 0.5 ; b·aᵀ/t is its transpose.
    ab = [[2.0, 2 * s], [0.0, 2 * s]]
    ba = [[2.0, 0.0], [2 * s, 2 * s]]

    def ce(rows):
        return sum(-row[i] + math.log(sum(math.exp(x) for x in row)) for i, row in enumerate(rows)) / len(rows)

    expected = (ce(ab) + ce(ba)) / 2
    assert losses.info_nce(a, b, t, gather=False).item() == pytest.approx(expected, rel=1e-6)


def test_reference_loss_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = 2.0
    logits = [[1 / t, 1 / t], [0.0, 1 / t]]  # a·bᵀ / t
    sim = [[(1 + 1) / 2, (0 + 1) / 2], [(0 + 1) / 2, (1 + 2) / 2]]  # (a·aᵀ + b·bᵀ) / 2

    def softmax(row):
        z = sum(math.exp(x) for x in row)
        return [math.exp(x) / z for x in row]

    targets = [softmax([x * t for x in row]) for row in sim]

    def soft_ce(logit_rows, target_rows):
        return [-sum(p * math.log(q) for p, q in zip(tr, softmax(lr))) for lr, tr in zip(logit_rows, target_rows)]

    transpose = lambda m: [list(r) for r in zip(*m)]  # noqa: E731
    per_row = [(x + y) / 2 for x, y in zip(soft_ce(logits, targets), soft_ce(transpose(logits), transpose(targets)))]
    expected = sum(per_row) / 2
    assert losses.reference_loss(a, b, torch.tensor(t)).item() == pytest.approx(expected, rel=1e-6)


def test_temperature_is_learnable_and_clamped():
    temp = losses.Temperature(0.05, 0.01, 1.0)
    assert temp().item() == pytest.approx(0.05)
    temp().backward()
    assert temp.log_value.grad is not None and temp.log_value.grad.abs().item() > 0
    with torch.no_grad():
        temp.log_value.fill_(math.log(5.0))
    assert temp().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        losses.Temperature(3.0, 0.01, 1.0)


def test_alignment_and_uniformity():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert losses.alignment(x, x) == pytest.approx(0.0)
    assert losses.alignment(x, x.flip(0)) == pytest.approx(2.0)  # orthogonal unit vectors: ‖e1−e2‖² = 2
    # Two orthogonal unit vectors: one pair at squared distance 2, log(exp(−4)) = −4.
    assert losses.uniformity(x) == pytest.approx(-4.0)


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 4, requires_grad=True)
    out, offset = gather_with_local_grad(x)
    assert out is x and offset == 0
