"""Sequential recommenders (SASRec, Bert4Rec, GRU4Rec) over ID or adapted LLM item representations."""
from __future__ import annotations

import numpy as np

from llmemb_dist.config import RatConfig
from llmemb_dist.srs.base import SeqRecommender
from llmemb_dist.srs.bert4rec import Bert4Rec
from llmemb_dist.srs.gru4rec import GRU4Rec
from llmemb_dist.srs.items import build_items
from llmemb_dist.srs.sasrec import SASRec


def build_model(cfg: RatConfig, backbone: str, item_repr: str, num_items: int, llm: np.ndarray | None = None,
                popularity: np.ndarray | None = None) -> SeqRecommender:
    """`popularity` (training interactions per item index) is what popularity-aware item representations
    start from; a model built to load a saved state does not need it. Given `llm`, any item representation,
    ID-only included, gets the text channel over it unless `rat.text_weights` offers only 0."""
    items = build_items(item_repr, num_items, cfg.hidden, cfg.adapter_hidden, llm, popularity, cfg.id_dropout)
    model = _backbone(cfg, backbone, items, num_items)
    if llm is not None and any(cfg.text_weights):
        model.attach_text(llm)
    return model


def _backbone(cfg: RatConfig, backbone: str, items, num_items: int) -> SeqRecommender:
    if backbone == "sasrec":
        return SASRec(items, num_items, cfg.hidden, cfg.layers, cfg.heads, cfg.dropout, cfg.max_len)
    if backbone == "bert4rec":
        return Bert4Rec(items, num_items, cfg.hidden, cfg.layers, cfg.heads, cfg.dropout, cfg.max_len, cfg.mask_prob)
    if backbone == "gru4rec":
        return GRU4Rec(items, num_items, cfg.hidden, cfg.layers, cfg.dropout)
    raise ValueError(f"unknown backbone {backbone!r}")


__all__ = ["SeqRecommender", "build_model"]
