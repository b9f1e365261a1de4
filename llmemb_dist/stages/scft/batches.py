"""SCFT batches: which items a worker trains on at a step, and their two augmented views.

Everything is a pure function of (seed, rank, step), so a run resumed from a checkpoint
at step s sees exactly the batches an uninterrupted run would have: none repeated, none skipped.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from llmemb_dist.data.catalog import augment, render_prompt

Attrs = list[tuple[str, str]]


def batch_indices(num_items: int, batch_size: int, step: int, seed: int, rank: int) -> np.ndarray:
    """Rows of this worker's shard at `step`: a fresh permutation per epoch, the tail of each epoch dropped."""
    steps_per_epoch = num_items // batch_size
    epoch, pos = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, rank, epoch]).permutation(num_items)
    return order[pos * batch_size:(pos + 1) * batch_size]


def view_pair(attrs: Attrs, drop_ratio: float, rng: random.Random) -> tuple[Attrs, Attrs]:
    return augment(attrs, drop_ratio, rng), augment(attrs, drop_ratio, rng)


class Views:
    """The two prompts of each item of a step.

    `fresh` draws new views every step (seeded by seed, rank and step); `reference` draws
    them once per item before training, as the official code does.
    """

    def __init__(self, items: Sequence[Attrs], instruction: str, drop_ratio: float, mode: str, seed: int, rank: int):
        self.items, self.instruction, self.drop_ratio = items, instruction, drop_ratio
        self.mode, self.seed, self.rank = mode, seed, rank
        self.fixed: list[tuple[Attrs, Attrs]] = []
        if mode == "reference":
            rng = random.Random(f"{seed}/{rank}/reference")
            self.fixed = [view_pair(attrs, drop_ratio, rng) for attrs in items]

    def prompts(self, indices: Sequence[int], step: int) -> tuple[list[str], list[str]]:
        if self.mode == "reference":
            pairs = [self.fixed[i] for i in indices]
        else:
            rng = random.Random(f"{self.seed}/{self.rank}/{step}")
            pairs = [view_pair(self.items[i], self.drop_ratio, rng) for i in indices]
        return ([render_prompt(self.instruction, a) for a, _ in pairs],
                [render_prompt(self.instruction, b) for _, b in pairs])
