"""One node of a Knowledge Transfer Graph: its fields, their checks and its JSON form.

A node is a timm model name with its kwargs, where its weights come from (a checkpoint,
timm's pretrained weights or a local pretrained file) and the recipe fields it overrides;
or a virtual node with none of those: ``ensemble``, the mean of its members' logits, or
``ema``, the logits of an exponential moving average of node ``of``'s weights.
:mod:`timm_dcl.graph` puts nodes together with their gates.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["Node", "ENSEMBLE", "EMA", "NODE_KEYS", "OPTIONAL_NODE_KEYS", "validate_node", "node_from_dict"]

ENSEMBLE = "ensemble"  # the model name of a virtual node: the mean of its members' logits
EMA = "ema"  # the model name of a virtual node: the logits of node `of`'s EMA (a mean teacher)
NODE_KEYS = ("model", "model_kwargs", "checkpoint", "frozen")
# optional per-node keys: weights and recipe overrides, written only when set
OPTIONAL_NODE_KEYS = ("pretrained", "pretrained_file", "lr", "opt", "weight_decay", "members", "of")
# the trainer sets these for every node (one class count for all, no hub weights)
_RESERVED_KWARGS = ("num_classes", "pretrained")


@dataclass
class Node:
    """One network of the graph: a timm model name, its kwargs, where its weights come from
    and the recipe fields it overrides (None: the run's value)."""

    model: str
    model_kwargs: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None
    frozen: bool = False
    pretrained: bool = False                 # timm's pretrained weights for the model name (and tag)
    pretrained_file: Optional[str] = None    # a local timm weight file instead of the hub's
    lr: Optional[float] = None
    opt: Optional[str] = None
    weight_decay: Optional[float] = None
    members: Optional[list[int]] = None      # an ensemble's nodes (None: every network)
    of: Optional[int] = None                 # an EMA node's network (the node whose EMA it is)

    @property
    def is_ensemble(self) -> bool:
        """A virtual node: no parameters, the mean of its members' logits."""
        return self.model == ENSEMBLE

    @property
    def is_ema(self) -> bool:
        """A virtual node: no parameters of its own, the logits of node ``of``'s EMA."""
        return self.model == EMA

    @property
    def is_virtual(self) -> bool:
        """Not a network: it learns nothing, has no weights file and no features."""
        return self.is_ensemble or self.is_ema

    @property
    def has_weights(self) -> bool:
        """Weights of its own: a checkpoint or pretrained weights (a frozen node needs one)."""
        return self.checkpoint is not None or self.pretrained or self.pretrained_file is not None

    @property
    def weights_source(self) -> str:
        if self.checkpoint is not None:
            return self.checkpoint
        if self.pretrained_file is not None:
            return f"pretrained file {self.pretrained_file}"
        return "timm pretrained" if self.pretrained else "-"


def validate_node(i: int, node: Node) -> None:
    """Check one node's fields; errors name the field (``nodes[i].lr``)."""
    where = f"nodes[{i}]"
    if not isinstance(node, Node):
        raise TypeError(f"{where}: expected a Node, got {type(node).__name__}")
    if not isinstance(node.model, str):
        raise TypeError(f"{where}.model: expected a string, got {type(node.model).__name__}")
    if not node.model.strip():
        raise ValueError(f"{where}.model: expected a non-empty model name")
    if not isinstance(node.model_kwargs, dict):
        raise TypeError(f"{where}.model_kwargs: expected a dict, got {type(node.model_kwargs).__name__}")
    for key in node.model_kwargs:
        if not isinstance(key, str):
            raise TypeError(f"{where}.model_kwargs: keys must be strings, got {key!r}")
        if key in _RESERVED_KWARGS:
            raise ValueError(f"{where}.model_kwargs: {key!r} is set by the trainer for every node, "
                             "not per node")
    try:
        json.dumps(node.model_kwargs, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}.model_kwargs: must be JSON-serialisable ({e})") from None
    if isinstance(node.checkpoint, os.PathLike):
        node.checkpoint = os.fspath(node.checkpoint)
    if node.checkpoint is not None and not isinstance(node.checkpoint, str):
        raise TypeError(f"{where}.checkpoint: expected a path string or None, "
                        f"got {type(node.checkpoint).__name__}")
    if node.checkpoint is not None and not node.checkpoint.strip():
        raise ValueError(f"{where}.checkpoint: expected a non-empty path or None")
    if not isinstance(node.frozen, bool):
        raise TypeError(f"{where}.frozen: expected a bool, got {type(node.frozen).__name__}")
    if not isinstance(node.pretrained, bool):
        raise TypeError(f"{where}.pretrained: expected a bool, got {type(node.pretrained).__name__}")
    if isinstance(node.pretrained_file, os.PathLike):
        node.pretrained_file = os.fspath(node.pretrained_file)
    if node.pretrained_file is not None and (not isinstance(node.pretrained_file, str)
                                             or not node.pretrained_file.strip()):
        raise TypeError(f"{where}.pretrained_file: expected a non-empty path or None, "
                        f"got {node.pretrained_file!r}")
    if node.checkpoint is not None and (node.pretrained or node.pretrained_file is not None):
        raise ValueError(f"{where}: give one source of weights, a checkpoint or pretrained weights, "
                         "not both")
    for name, low in (("lr", 0.0), ("weight_decay", 0.0)):
        value = getattr(node, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}.{name}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < low or (name == "lr" and value == 0):
            raise ValueError(f"{where}.{name}: must be finite and {'> 0' if name == 'lr' else '≥ 0'}, "
                             f"got {value!r}")
        setattr(node, name, float(value))
    if node.opt is not None and (not isinstance(node.opt, str) or not node.opt.strip()):
        raise TypeError(f"{where}.opt: expected an optimiser name (e.g. 'sgd', 'adamw'), got {node.opt!r}")
    if node.is_virtual:
        # a virtual node: nothing to load, nothing to build, nothing to optimise
        what = "an ensemble node" if node.is_ensemble else "an EMA node"
        for key in ("model_kwargs", "checkpoint", "pretrained", "pretrained_file", "lr", "opt", "weight_decay"):
            if getattr(node, key) not in (None, False, {}):
                raise ValueError(f"{where}.{key}: {what} has no parameters of its own, so it takes no {key}")
    if node.is_ema:
        if node.of is None:
            raise ValueError(f"{where}.of: an EMA node needs the index of the node whose EMA it is "
                             '(graph JSON {"model": "ema", "of": N}; --node-models ema:N)')
        if isinstance(node.of, bool) or not isinstance(node.of, int):
            raise TypeError(f"{where}.of: expected a node index, got {node.of!r}")
    elif node.of is not None:
        raise ValueError(f"{where}.of: only an EMA node (model {EMA!r}) has 'of', node {i} is {node.model!r}")


def node_from_dict(i: int, raw: Any) -> Node:
    where = f"nodes[{i}]"
    if isinstance(raw, str):  # shorthand for hand-written files: just the model name
        raw = {"model": raw}
    if not isinstance(raw, Mapping):
        raise TypeError(f"{where}: expected an object or a model name, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in NODE_KEYS + OPTIONAL_NODE_KEYS]
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; a node has "
                         f"{', '.join(NODE_KEYS + OPTIONAL_NODE_KEYS)}")
    if "model" not in raw:
        raise ValueError(f"{where}.model: missing")
    model = raw["model"]
    if not isinstance(model, str):
        raise TypeError(f"{where}.model: expected a string, got {type(model).__name__}")
    kwargs = raw.get("model_kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"{where}.model_kwargs: expected an object, got {type(kwargs).__name__}")
    checkpoint = raw.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise TypeError(f"{where}.checkpoint: expected a string or null, got {type(checkpoint).__name__}")
    frozen = raw.get("frozen", False)
    if not isinstance(frozen, bool):
        raise TypeError(f"{where}.frozen: expected true or false, got {type(frozen).__name__}")
    optional = {k: raw[k] for k in OPTIONAL_NODE_KEYS if raw.get(k) is not None}
    return Node(model, dict(kwargs), checkpoint, frozen, **optional)
