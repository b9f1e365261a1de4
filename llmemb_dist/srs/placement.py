"""Where a trained recommender puts any item, trained or not: the transform RAT publishes and adapt applies.

An `ItemPlacement` is a trained item representation plus what RAT trained it on: the item ids in
row order, their text hashes and the exact vectors RAT published. Given an item's id, text hash and
raw LLM vector it returns
- the published vector, bit for bit, for a trained item whose text is unchanged;
- the representation's `with_llm` vector otherwise: its text side for an item nobody interacted with
  (times the spec's `new_item_scale`, calibrated after training: stages/rat/calibrate.py), its text side
  with its trained part for a trained item whose text changed.
It is saved as JSON and safetensors (nothing that can execute code), read back the same way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmemb_dist.srs.items import build_items

CONFIG_FILE = "placement.json"
TENSORS_FILE = "placement.safetensors"
PUBLISHED = "published"  # the tensor of published vectors, row k for item k (row 0 unused)
NEW_ITEM_SCALE = "new_item_scale"  # spec key: a new item's text side is multiplied by it (1 when absent)


class ItemPlacement:
    def __init__(self, items: nn.Module, spec: dict[str, Any], item_ids: list[str], text_hashes: list[str],
                 published: torch.Tensor):
        if len(item_ids) != len(text_hashes) or published.shape[0] != len(item_ids) + 1:
            raise ValueError(f"a placement needs one id, text hash and vector per item: {len(item_ids)} ids, "
                             f"{len(text_hashes)} hashes, {published.shape[0] - 1} vectors")
        self.items, self.spec = items.eval(), spec
        self.item_ids, self.text_hashes = item_ids, text_hashes
        self.published = published.detach().float().clone()  # its own memory: safetensors refuses shared tensors
        self.row = {item: k + 1 for k, item in enumerate(item_ids)}

    @torch.no_grad()
    def vectors(self, item_ids: list[str], text_hashes: list[str], raw: np.ndarray) -> np.ndarray:
        """The recommender-space vector of each item, (n, hidden) float32."""
        index = torch.tensor([self.row.get(item, 0) for item in item_ids], dtype=torch.long)
        unchanged = torch.tensor([k > 0 and self.text_hashes[k - 1] == h for k, h in zip(index.tolist(), text_hashes)],
                                 dtype=torch.bool)
        out = self.published[index].clone()
        todo = ~unchanged
        if bool(todo.any()):
            placed = self.items.with_llm(torch.as_tensor(raw[todo.numpy()], dtype=torch.float32), index[todo]).float()
            new = (index[todo] == 0)[:, None]
            out[todo] = torch.where(new, placed * float(self.spec.get(NEW_ITEM_SCALE, 1.0)), placed)
        return out.numpy()

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"items.{k}": v.detach().contiguous() for k, v in self.items.state_dict().items()}
        tensors[PUBLISHED] = self.published
        save_file(tensors, str(folder / TENSORS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(
            {**self.spec, "item_ids": self.item_ids, "text_hashes": self.text_hashes}))

    @classmethod
    def load(cls, folder: str | Path) -> "ItemPlacement":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / TENSORS_FILE))
        item_ids, text_hashes = config.pop("item_ids"), config.pop("text_hashes")
        items = build_items(config["item_repr"], len(item_ids), config["hidden"], config["adapter_hidden"],
                            np.zeros((len(item_ids), config["llm_dim"]), dtype=np.float32))
        state = {k[len("items."):]: v for k, v in tensors.items() if k.startswith("items.")}
        items.load_state_dict(state)
        return cls(items, config, item_ids, text_hashes, tensors[PUBLISHED])
