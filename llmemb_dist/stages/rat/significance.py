"""How a model compares with the strongest baseline: ratios of test NDCG@10 under full ranking, with a
paired test over the same test users.

The strongest baseline is chosen on validation, never on test. The paired test is a two-sided sign-flip
randomization test of the mean per-user NDCG@10 difference: under the null hypothesis that the two models
are exchangeable for each user, every difference is as likely negated.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
GROUPS = ("overall", "head", "tail")


def per_user_ndcg(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k from the 0-based rank of the true item."""
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def paired_p_value(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) = 0 over paired per-user values (sign-flip randomization test)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) == 0:
        return 1.0
    observed = abs(d.mean())
    rng = np.random.default_rng(seed)
    rows = max(1, min(resamples, (1 << 22) // len(d)))  # about 32 MiB of signs at a time
    at_least, done = 0, 0
    while done < resamples:
        n = min(rows, resamples - done)
        signs = rng.integers(0, 2, size=(n, len(d)), dtype=np.int8) * 2 - 1
        at_least += int((np.abs(signs @ d) / len(d) >= observed - 1e-12).sum())
        done += n
    return (at_least + 1) / (resamples + 1)


def strongest(valid: dict[str, dict], protocol: str) -> str:
    """The name whose validation NDCG@10 (overall, under `protocol`) is highest; `valid` maps names to
    validation summaries."""
    return max(valid, key=lambda name: valid[name][protocol]["overall"]["NDCG@10"])


def compare(main_ranks: np.ndarray, baseline_ranks: np.ndarray, head: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Per group of test users (overall, head and tail targets): both models' test NDCG@10, their ratio
    (None where the baseline's is 0) and the paired p-value."""
    main, base = per_user_ndcg(main_ranks), per_user_ndcg(baseline_ranks)
    masks = {"overall": np.ones(len(main), dtype=bool), "head": head, "tail": ~head}
    out = {}
    for group in GROUPS:
        m, b = main[masks[group]], base[masks[group]]
        mean_m, mean_b = float(m.mean()) if len(m) else 0.0, float(b.mean()) if len(b) else 0.0
        out[group] = {"model": mean_m, "baseline": mean_b, "ratio": mean_m / mean_b if mean_b > 0 else None,
                      "p_value": paired_p_value(m, b), "users": int(len(m))}
    return out
