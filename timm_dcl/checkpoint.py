"""Checkpoint files: a node's weights (reusable as a frozen teacher) and training states.

Every write goes through :mod:`.safe_io`: a temporary file renamed into place (a run killed
mid-save leaves the previous checkpoint intact) with its SHA-256 beside it, which every load
verifies (a damaged file is one line, not PyTorch's stack).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .safe_io import load_torch, save_torch

__all__ = [
    "atomic_save",
    "save_node_weights",
    "load_node_weights",
    "rng_state",
    "set_rng_state",
    "node_weights_name",
]

NODE_FORMAT = "timm_dcl.node.v1"


def atomic_save(obj: Any, path: str | os.PathLike, *, keep_previous: bool = False) -> None:
    """``torch.save`` into place atomically, its checksum beside it (see :func:`.safe_io.save_torch`)."""
    save_torch(obj, path, keep_previous=keep_previous)


def node_weights_name(index: int, model: str) -> str:
    return f"node{index}_{model}.pth"


def save_node_weights(path: str | os.PathLike, model: nn.Module, *, model_name: str,
                      model_kwargs: dict, num_classes: int, dataset: str | None, top1: float | None = None,
                      ema: nn.Module | None = None) -> None:
    """A node's weights with enough metadata to check them when they are loaded again; ``ema``: its
    EMA's too, as ``state_dict_ema`` (timm's key; a later load takes ``state_dict``)."""
    extra = {} if ema is None else {
        "state_dict_ema": {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}}
    atomic_save({
        "format": NODE_FORMAT,
        "model": model_name,
        "model_kwargs": dict(model_kwargs),
        "num_classes": int(num_classes),
        "dataset": dataset,
        "top1": top1,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},  # NCHW, safetensors-ready
        **extra,
    }, path)


def _extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(obj, dict) and obj.get("format") == NODE_FORMAT:
        return obj["state_dict"], obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                return obj[key], {}
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, {}
    raise ValueError(f"{path}: not a model checkpoint (expected a node weights file or a state_dict)")


def load_node_weights(path: str | os.PathLike, model: nn.Module, *, model_name: str, num_classes: int,
                      where: str = "node", new_head_ok: bool = False,
                      head_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load weights into ``model``, with an error that says what does not fit.

    ``new_head_ok`` (a warm start): weights trained for another class count load all but the
    classifier (``head_keys``), which keeps its fresh initialisation; the returned metadata
    then has ``_head_reset=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: checkpoint {path} does not exist")
    try:
        obj = load_torch(path, weights_only=True)
    except ValueError as e:  # DamagedFileError: which node's file, in one line
        raise ValueError(f"{where}: checkpoint {e}") from None
    state, meta = _extract_state_dict(obj, path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head_reset = False
    if new_head_ok and head_keys and any(k in state and k in own and state[k].shape != own[k].shape
                                         for k in head_keys):
        state = {k: v for k, v in state.items() if k not in head_keys}
        state.update({k: own[k] for k in head_keys if k in own})
        head_reset = True
    if meta:
        meta = dict(meta)
        if meta.get("model") != model_name:
            raise ValueError(f"{where}: checkpoint {path} holds a {meta.get('model')!r}, not a {model_name!r}")
        if meta.get("num_classes") != num_classes and not head_reset:
            raise ValueError(f"{where}: checkpoint {path} was trained for {meta.get('num_classes')} classes, "
                             f"but this data set has {num_classes}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where}: checkpoint {path} does not fit {model_name!r}: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        k, theirs, ours = bad[0]
        raise ValueError(f"{where}: checkpoint {path} does not fit {model_name!r} with {num_classes} classes: "
                         f"{k} has shape {theirs} in the checkpoint, {ours} in the model "
                         f"({len(bad)} tensors differ)")
    model.load_state_dict(state)
    meta = dict(meta)
    meta["_head_reset"] = head_reset
    return meta


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
