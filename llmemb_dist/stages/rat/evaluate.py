"""Leave-one-out evaluation: HR and NDCG at k under sampled negatives and full ranking, by group.

Two protocols, because sampled metrics can mislead: (a) the paper's, the true item
among `num_negatives` seeded items the user never touched; (b) full ranking over the
catalog minus the items already in the user's input. Groups: head vs tail target items
(head = the most popular `head_fraction` by training interactions) and short vs long
users (training length at most `short_user_max_len`). Ties count against the true
item, so a constant scorer gets no credit; a true item whose score is not finite ranks last.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from llmemb_dist.config import EvalConfig
from llmemb_dist.data.sequences import Ragged, Sequences, pad_left
from llmemb_dist.progress import Progress
from llmemb_dist.srs.base import unit_text_table
from llmemb_dist.storage import DataError

log = logging.getLogger(__name__)


@dataclass
class Scorer:
    """A user's score for item j is users(inputs) . items[j]. Kept as the two factors so that the sampled
    protocol scores each user's 101 candidates, not the whole catalog (over half of a validation pass)."""

    users: Callable[[torch.Tensor], torch.Tensor]  # left-padded inputs (B, L) -> (B, h)
    items: torch.Tensor  # (num_items + 1, h); row 0 is padding, never a candidate


PROTOCOLS = ("sampled", "full")
GROUPS = ("overall", "head", "tail", "short", "long")


@dataclass
class EvalSplit:
    name: str
    inputs: Ragged
    targets: np.ndarray
    negatives: np.ndarray  # (users, num_negatives); 0 fills rows of users who touched almost everything
    head: np.ndarray  # per user: is the target a head item
    short: np.ndarray  # per user: is the user's training sequence short


def head_items(popularity: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean per item index: the top `fraction` of items by training popularity (ties by index)."""
    num_items = len(popularity) - 1
    order = np.argsort(-popularity[1:], kind="stable") + 1
    head = np.zeros(len(popularity), dtype=bool)
    head[order[: math.ceil(fraction * num_items)]] = True
    return head


NEGATIVE_CHUNK = 4096  # users whose negatives are drawn together: a few MiB of draws, any number of users


def sample_negatives(data: Sequences, count: int, rng: np.random.Generator, warn: bool = True) -> np.ndarray:
    """`count` distinct items per user, drawn uniformly from the items the user never touched; `warn` logs how
    many users have fewer than that to draw from. Vectorised over users: an item is recognised as touched by
    looking up (user, item) in the sorted keys of the user's events."""
    stride = data.num_items + 1
    touched = np.unique(data.events.row_index() * stride + data.events.values)
    free = data.num_items - np.bincount(touched // stride, minlength=data.num_users)
    want = np.minimum(count, free)
    short = int((free < count).sum())
    if short and warn:
        log.warning("%d of %d users touched so many items that fewer than %d are left to sample as negatives: "
                    "they are ranked among all they did not touch", short, data.num_users, count)
    out = np.zeros((data.num_users, count), dtype=np.int64)
    for start in range(0, data.num_users, NEGATIVE_CHUNK):
        users = np.arange(start, min(start + NEGATIVE_CHUNK, data.num_users))
        got = np.zeros(len(users), dtype=np.int64)
        while (pending := np.flatnonzero(got < want[users])).size:
            draw = rng.integers(1, stride, size=(len(pending), 2 * count))
            keys = users[pending, None] * stride + draw
            found = np.searchsorted(touched, keys).clip(max=len(touched) - 1)
            draw[touched[found] == keys] = 0
            rows = np.concatenate([out[users[pending]], draw], axis=1)
            out[users[pending]], got[pending] = first_distinct(rows, want[users[pending]], count)
    return out


def first_distinct(rows: np.ndarray, want: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first `want` distinct non-zero values in their order, left-aligned in `width` columns with
    0 after them, and how many each row got."""
    order = np.argsort(rows, axis=1, kind="stable")
    ordered = np.take_along_axis(rows, order, axis=1)
    repeat = np.zeros_like(rows, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    keep = np.zeros_like(repeat)
    np.put_along_axis(keep, order, ~repeat, axis=1)
    keep &= rows != 0
    packed = np.take_along_axis(rows, np.argsort(~keep, axis=1, kind="stable"), axis=1)
    have = np.minimum(keep.sum(1), want)
    return np.where(np.arange(width) < have[:, None], packed[:, :width], 0), have


def check_negatives(data: Sequences, cfg: EvalConfig) -> None:
    """The sampled protocol needs `num_negatives` items besides the true one: more than the catalog can give
    is an impossible setting, not a metric of 1.0."""
    if cfg.num_negatives >= data.num_items:
        raise DataError(f"rat.eval.num_negatives={cfg.num_negatives}, but the catalog has {data.num_items} items: "
                        f"the sampled protocol needs fewer negatives than items (at most {data.num_items - 1})")


def make_split(data: Sequences, name: str, cfg: EvalConfig, warn: bool = True) -> EvalSplit:
    """The split's users with their negatives; `warn`: say how many users leave too few items to sample (the
    same count for every split of one dataset, so one split of a run says it)."""
    check_negatives(data, cfg)
    inputs, targets = data.split(name)
    rng = np.random.default_rng([cfg.seed, {"valid": 0, "test": 1}[name]])
    head = head_items(data.train_popularity(), cfg.head_fraction)
    train_lens = data.events.lengths - 2
    return EvalSplit(
        name=name, inputs=inputs, targets=targets, negatives=sample_negatives(data, cfg.num_negatives, rng, warn),
        head=head[targets], short=train_lens <= cfg.short_user_max_len,
    )


ITEM_CHUNK = 1 << 16  # items full ranking scores at a time: a batch holds batch x ITEM_CHUNK scores, any catalog


def leave_out_seen(scores: torch.Tensor, inputs: Ragged, offset: int = 0) -> None:
    """Full ranking's candidates, in place: padding and each user's input items score -inf. `scores` holds
    the items from index `offset` on (a chunk of the catalog), row r for `inputs[r]`."""
    if offset == 0:
        scores[:, 0] = -torch.inf
    inside = (inputs.values >= offset) & (inputs.values < offset + scores.shape[1])
    rows = torch.from_numpy(inputs.row_index()[inside])
    scores[rows, torch.from_numpy(inputs.values[inside] - offset)] = -torch.inf


def full_ranks(users: torch.Tensor, true: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
               inputs: Ragged) -> np.ndarray:
    """Each user's rank of `true` among every item but padding, their inputs and the target, counted chunk by
    chunk of ITEM_CHUNK items: never a users x catalog matrix."""
    above = torch.zeros(len(users), dtype=torch.long)
    rows = torch.arange(len(users))
    for offset in range(0, len(items), ITEM_CHUNK):
        scores = users @ items[offset: offset + ITEM_CHUNK].float().T
        leave_out_seen(scores, inputs, offset)
        inside = (target >= offset) & (target < offset + scores.shape[1])
        scores[rows[inside], target[inside] - offset] = -torch.inf
        above += (scores >= true[:, None]).sum(1)
    return torch.where(torch.isfinite(true), above, len(items) - 1).numpy()


def sample_users(split: EvalSplit, count: int, seed: int) -> EvalSplit:
    """A seeded sample of `count` of the split's users (all of them when count is 0 or covers them)."""
    if not count or count >= len(split.targets):
        return split
    users = np.sort(np.random.default_rng([seed, 2]).choice(len(split.targets), size=count, replace=False))
    return EvalSplit(split.name, split.inputs.take(users), split.targets[users], split.negatives[users],
                     split.head[users], split.short[users])


@torch.no_grad()
def ranks(scorer: Scorer, split: EvalSplit, users: np.ndarray, max_len: int, batch_size: int = 256,
          protocols: tuple[str, ...] = PROTOCOLS) -> dict[str, np.ndarray]:
    """0-based rank of each user's true item under `protocols`, for the given users."""
    out = {p: np.zeros(len(users), dtype=np.int64) for p in protocols}
    # Similar lengths together: each batch is padded only to its longest input.
    order = np.argsort(split.inputs.lengths[users], kind="stable")
    progress = Progress(log, f"evaluate {split.name}", len(order), unit="users", quiet_start=True)
    for start in range(0, len(order), batch_size):
        progress.update(start)
        pick = order[start: start + batch_size]
        batch = users[pick]
        inputs = split.inputs.take(batch)
        seqs = torch.as_tensor(pad_left(inputs, max_len))
        user_vectors = scorer.users(seqs).float()
        target = torch.as_tensor(split.targets[batch])
        if "sampled" in out:
            candidates = torch.cat([target[:, None], torch.as_tensor(split.negatives[batch])], dim=1)
            cand_scores = torch.bmm(scorer.items[candidates].float(), user_vectors[:, :, None]).squeeze(-1)
            cand_scores = cand_scores.masked_fill(candidates == 0, -torch.inf)  # padding fills short negative lists
            out["sampled"][pick] = rank_against(cand_scores[:, :1].squeeze(1), cand_scores[:, 1:], split.negatives.shape[1])
        if "full" not in out:
            continue
        true = (user_vectors * scorer.items[target].float()).sum(1)
        out["full"][pick] = full_ranks(user_vectors, true, scorer.items, target, inputs)
    return out


def rank_against(true: torch.Tensor, others: torch.Tensor, worst: int) -> np.ndarray:
    """0-based rank of each row's true score among `others` (ties against it). A true score that is not finite
    ranks `worst`, last: a diverged model's NaN compares false with everything, which would rank it first."""
    rank = (others >= true[:, None]).sum(1)
    return torch.where(torch.isfinite(true), rank, worst).numpy()


def metrics_from_ranks(rank: np.ndarray, ks: list[int]) -> dict[str, float]:
    result: dict[str, float] = {"users": int(len(rank))}
    for k in ks:
        hit = rank < k
        result[f"HR@{k}"] = float(hit.mean()) if len(rank) else 0.0
        result[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean()) if len(rank) else 0.0
    return result


def summarize(split: EvalSplit, user_ranks: dict[str, np.ndarray], ks: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """{protocol: {group: {"HR@k", "NDCG@k", "users"}}} for ranks of all users of the split, per protocol ranked."""
    masks = {"overall": np.ones(len(split.targets), dtype=bool), "head": split.head, "tail": ~split.head,
             "short": split.short, "long": ~split.short}
    return {p: {g: metrics_from_ranks(r[m], ks) for g, m in masks.items()} for p, r in user_ranks.items()}


def evaluate(scorer: Scorer, split: EvalSplit, cfg: EvalConfig, max_len: int) -> dict[str, dict[str, dict[str, float]]]:
    users = np.arange(len(split.targets))
    return summarize(split, ranks(scorer, split, users, max_len), cfg.ks)


def popularity_scorer(popularity: np.ndarray) -> Scorer:
    """The most-popular baseline: every user gets the items ranked by training popularity."""
    return Scorer(lambda seqs: torch.ones(len(seqs), 1), torch.as_tensor(popularity, dtype=torch.float32)[:, None])


def text_only_scorer(llm: np.ndarray) -> Scorer:
    """The text-only baseline: items ranked by the cosine of their LLM vectors (row k - 1 for item k) to the
    user's last item's."""
    table = unit_text_table(llm)
    return Scorer(lambda seqs: table[seqs[:, -1]], table)  # inputs are left-padded: the last column is the last item
