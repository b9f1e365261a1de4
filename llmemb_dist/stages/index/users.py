"""The users an index is checked on: a seeded sample of the validation users of the dataset RAT trained on,
each as the vector the recommender scores them with over their validation inputs."""
from __future__ import annotations

import numpy as np

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID
from llmemb_dist.data.sequences import build_sequences

BATCH = 256  # users per forward pass of the backbone


def validation_histories(rat_uri: str, rat_manifest: dict, known: set[str], count: int, seed: int) -> list[list[str]]:
    """Up to `count` validation inputs (item ids, oldest first), users drawn with `seed`; a user whose
    history holds an item outside `known` is left out."""
    dataset = rat_manifest.get("inputs", {}).get("dataset")
    if not dataset:
        raise storage.DataError(f"{rat_uri}: the RAT publication names no dataset to draw validation users from")
    interactions = storage.read_table(dataset, "interactions")
    active = sorted(set(interactions.column(ITEM_ID).unique().to_pylist()))
    data = build_sequences(interactions, active, f"{dataset}/interactions")
    inputs, _ = data.split("valid")
    order = np.random.default_rng(seed).permutation(len(inputs))
    histories = []
    for u in order:
        history = [active[k - 1] for k in inputs[u]]
        if set(history) <= known:
            histories.append(history)
            if len(histories) == count:
                break
    if not histories:
        raise storage.DataError(f"{rat_uri}: no validation user of {dataset} has a history inside the indexed items")
    return histories


def user_vectors(recommender, histories: list[list[str]]) -> np.ndarray:
    """(users, d) float32: what `recommender` scores each history with."""
    return np.concatenate([recommender.user_vectors(histories[i: i + BATCH]) for i in range(0, len(histories), BATCH)])
