"""Cold-start evaluation: full ranking over every item, the held-out cold ones included, with the cold
items placed the way the adapt stage places items that arrive after training (`ItemPlacement.vectors`).

Groups: every test user, those whose target is warm (and its head and tail items, by warm training
popularity) and those whose target is cold. Two references beside the trained models: ID-only, whose
cold items keep the untrained start of an ID vector (it has nothing else to give them), and text-only,
which ranks items by the cosine of their LLM vectors to the user's last item.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from llmemb_dist.config import EvalConfig, RatConfig
from llmemb_dist.data.cold import ColdSplit
from llmemb_dist.srs import SeqRecommender
from llmemb_dist.srs.placement import ItemPlacement
from llmemb_dist.stages.rat.evaluate import EvalSplit, Scorer, head_items, metrics_from_ranks, ranks, text_only_scorer
from llmemb_dist.stages.rat.references import TEXT_ONLY

COLD_GROUPS = ("overall", "warm", "warm head", "warm tail", "cold")


def untrained_vectors(count: int, hidden: int, num_items: int, seed: int) -> torch.Tensor:
    """What an ID table holds for items it never trained: the start IdItems gives its whole table."""
    table = torch.empty(num_items + 1, hidden)
    nn.init.xavier_normal_(table, generator=torch.Generator().manual_seed(seed))
    return table[len(table) - count:]  # the cold items are the last rows of the test index


def cold_item_vectors(placement: ItemPlacement | None, split: ColdSplit, raw_cold: np.ndarray | None,
                      hidden: int, seed: int) -> torch.Tensor:
    """The cold items' vectors: the placement of an item without interactions, or, without a placement
    (an ID-only model, which cannot place one), the untrained start of an ID vector."""
    cold_ids = split.item_ids[split.num_warm:]
    if placement is None:
        return untrained_vectors(len(cold_ids), hidden, len(split.item_ids), seed)
    return torch.from_numpy(placement.vectors(cold_ids, [""] * len(cold_ids), raw_cold))


def _test_split(split: ColdSplit) -> EvalSplit:
    n = len(split.test_targets)
    return EvalSplit("test", split.test_inputs, split.test_targets, np.zeros((n, 1), dtype=np.int64),
                     np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))


def _grouped(split: ColdSplit, rank: np.ndarray, cfg: EvalConfig) -> dict[str, dict[str, float]]:
    head = np.zeros(len(split.item_ids) + 1, dtype=bool)
    head[: split.num_warm + 1] = head_items(split.warm.train_popularity(), cfg.head_fraction)
    cold = split.cold_target
    target_head = head[split.test_targets]
    masks = {"overall": np.ones(len(rank), dtype=bool), "warm": ~cold, "warm head": ~cold & target_head,
             "warm tail": ~cold & ~target_head, "cold": cold}
    return {g: metrics_from_ranks(rank[masks[g]], cfg.ks) for g in COLD_GROUPS}


def cold_start_metrics(model: SeqRecommender, cold_vectors: torch.Tensor, split: ColdSplit, cfg: EvalConfig,
                       max_len: int) -> dict[str, dict[str, float]]:
    """{group: {"HR@k", "NDCG@k", "users"}} of a model trained on `split.warm`, under full ranking."""
    model.eval()
    with torch.no_grad():
        table = model.item_vectors(torch.cat([model.items.table().float(), cold_vectors.float()]))
        rank = ranks(Scorer(model.user_vectors, table), _test_split(split), np.arange(len(split.test_targets)),
                     max_len, protocols=("full",))["full"]
    return _grouped(split, rank, cfg)


def text_only_metrics(llm: np.ndarray, split: ColdSplit, cfg: EvalConfig, max_len: int) -> dict[str, dict[str, float]]:
    """The text-only reference: `llm` holds row k - 1 for item k of `split.item_ids`."""
    rank = ranks(text_only_scorer(llm), _test_split(split), np.arange(len(split.test_targets)), max_len, protocols=("full",))["full"]
    return _grouped(split, rank, cfg)


def cold_start_report(rcfg: RatConfig, split: ColdSplit, models: dict[str, tuple[SeqRecommender, ItemPlacement | None]],
                      llm: np.ndarray | None) -> dict[str, dict]:
    """Full-ranking test figures on warm and cold targets per model, and the text-only reference's."""
    raw_cold = None if llm is None else llm[split.num_warm:]
    for model, _ in models.values():
        if model.text is not None:  # the text channel over every item ranked, the cold ones too
            model.attach_text(llm)
    out = {name: cold_start_metrics(model, cold_item_vectors(placement, split, raw_cold, rcfg.hidden, rcfg.seed),
                                    split, rcfg.eval, rcfg.max_len)
           for name, (model, placement) in models.items()}
    if llm is not None:
        out[TEXT_ONLY] = text_only_metrics(llm, split, rcfg.eval, rcfg.max_len)
    return out
