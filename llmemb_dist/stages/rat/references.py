"""The untrained references every RAT model is judged beside, on the same splits and protocols:
most-popular (training popularity) and, with LLM embeddings, text-only (cosine to the user's last item)."""
from __future__ import annotations

import numpy as np

from llmemb_dist.config import RatConfig
from llmemb_dist.data.sequences import Sequences
from llmemb_dist.stages.rat.evaluate import EvalSplit, Scorer, popularity_scorer, ranks, summarize, text_only_scorer

MOST_POPULAR = "most-popular"
TEXT_ONLY = "text-only"


def reference_scorers(data: Sequences, llm: np.ndarray | None) -> dict[str, Scorer]:
    scorers = {MOST_POPULAR: popularity_scorer(data.train_popularity())}
    if llm is not None:
        scorers[TEXT_ONLY] = text_only_scorer(llm)
    return scorers


def reference_results(data: Sequences, llm: np.ndarray | None, rcfg: RatConfig, valid: EvalSplit,
                      test: EvalSplit) -> dict[str, dict]:
    """{name: {"valid", "test", "test_ranks"}}, the shape a trained model's final evaluation has."""
    out = {}
    for name, scorer in reference_scorers(data, llm).items():
        valid_ranks = ranks(scorer, valid, np.arange(len(valid.targets)), rcfg.max_len)
        test_ranks = ranks(scorer, test, np.arange(len(test.targets)), rcfg.max_len)
        out[name] = {"valid": summarize(valid, valid_ranks, rcfg.eval.ks), "test": summarize(test, test_ranks, rcfg.eval.ks),
                     "test_ranks": test_ranks["full"]}
    return out
