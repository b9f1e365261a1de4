"""The paired test and the choice of the strongest baseline (stages/rat/significance.py)."""
import numpy as np

from llmemb_dist.stages.rat.significance import compare, paired_p_value, per_user_ndcg, strongest


def test_paired_test_finds_a_known_difference_and_none_where_there_is_none():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, size=2000)
    better = base + 0.05 + rng.normal(0, 0.1, size=2000)  # mean difference 0.05, about 16 standard errors
    assert paired_p_value(better, base) < 0.001
    assert paired_p_value(base, better) < 0.001  # two-sided
    assert paired_p_value(base, base.copy()) == 1.0
    # Differences that are pure noise around 0: no evidence; the same seed gives the same p.
    noise = base + rng.normal(0, 0.1, size=2000)
    noise += base.mean() - noise.mean()  # mean difference exactly 0
    assert paired_p_value(noise, base) > 0.5
    assert paired_p_value(noise, base, seed=3) == paired_p_value(noise, base, seed=3)
    # A small difference on few users is not significant.
    assert paired_p_value(base[:10] + 0.01 * rng.normal(size=10), base[:10]) > 0.05


def test_per_user_ndcg_and_comparison_by_group():
    assert per_user_ndcg(np.array([0, 1, 9, 10])).tolist() == [1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0]
    model = np.array([0, 0, 0, 20, 0, 0])
    base = np.array([20, 20, 20, 20, 0, 0])
    head = np.array([True, True, True, True, False, False])
    out = compare(model, base, head)
    assert out["overall"]["model"] == 5 / 6 and out["overall"]["baseline"] == 2 / 6
    assert out["head"]["ratio"] is None  # the baseline has no head hit
    assert out["tail"]["ratio"] == 1.0 and out["tail"]["p_value"] == 1.0
    assert out["head"]["users"] == 4 and out["tail"]["users"] == 2


def test_the_strongest_baseline_is_chosen_on_validation():
    def summary(ndcg):
        return {"full": {"overall": {"NDCG@10": ndcg}}}
    valid = {"most-popular": summary(0.02), "sasrec-id": summary(0.05), "sasrec-id+text": summary(0.06)}
    assert strongest(valid, "full") == "sasrec-id+text"
