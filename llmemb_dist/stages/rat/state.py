"""RAT's resumable training state on storage: tensors as safetensors, everything else as JSON.

A checkpoint is found by Ray Train under the run's storage, not through a manifest, so anyone who can
write there could plant a file in it: nothing here unpickles, and a checkpoint in any other form
(the pickled `state.pt` of earlier versions included) is refused rather than loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmemb_dist.storage import DataError

TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
TENSOR, INT_KEYS = "__tensor__", "__int_keys__"


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        # A copy of its own: safetensors refuses tensors that share memory (tied or viewed weights).
        tensors[path] = value.detach().cpu().clone().contiguous()
        return {TENSOR: path}
    if isinstance(value, dict):
        if value and all(isinstance(k, int) for k in value):  # an optimizer's per-parameter state
            return {INT_KEYS: [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"RAT state at {path!r}: dict keys must be all strings or all integers")
        return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"RAT state at {path!r}: cannot store a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if TENSOR in value:
            return tensors[value[TENSOR]]
        if INT_KEYS in value:
            return {int(k): _decode(v, tensors) for k, v in value[INT_KEYS]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_state(state: dict[str, Any], folder: str | Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(state, tensors, "state")
    save_file(tensors, str(Path(folder) / TENSORS_FILE))
    (Path(folder) / META_FILE).write_text(json.dumps(meta))


def load_state(folder: str | Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TENSORS_FILE).is_file() or not (folder / META_FILE).is_file():
        raise DataError(f"{folder}: not a RAT checkpoint of this version (it needs {TENSORS_FILE} and {META_FILE}; "
                        f"found {sorted(p.name for p in folder.iterdir())}); nothing in it was loaded. "
                        "Choose another rat.run to train afresh")
    try:
        return _decode(json.loads((folder / META_FILE).read_text()), load_file(str(folder / TENSORS_FILE)))
    except (SafetensorError, ValueError, KeyError, OSError) as e:
        raise DataError(f"{folder}: unreadable RAT checkpoint ({e}); choose another rat.run to train afresh") from e
