"""A Knowledge Transfer Graph: its nodes (timm models), its M×M gates and its temperature.

``gates[t][s]`` is the gate on the edge from source ``s`` into target ``t``; the diagonal is
the edge from the ground-truth label (SPEC §1). Node 0 is the target and is always trained.

Frozen nodes (SPEC §3): a node whose gate row is all cutoff learns nothing, so it must be a
pre-trained teacher loaded from weights. ``Graph`` therefore *infers* ``frozen=True`` for every
node other than 0 that has weights of its own (a checkpoint or a pretrained file) and an
all-cutoff row, and rejects a frozen node without weights or with any non-cutoff incoming
gate. A trainable node may also have a checkpoint: it then starts from those weights (a warm
start), as it does from timm's pretrained weights (``pretrained``/``pretrained_file``).

Ensemble nodes: a node whose model is ``ensemble`` is virtual, with no parameters; its logits
are the mean of its members' logits (``members``: node indices, or None for every non-ensemble
node). It only teaches: its gate row must be all cutoff, and it is neither frozen nor trainable.
It may be node 0, and then node 0's top-1 is the ensemble's.

EMA nodes: a node whose model is ``ema`` is virtual too; its logits are those of the
exponential moving average (timm's ``ModelEmaV3``) of node ``of``'s weights, on the same batch.
It only teaches (its gate row must be all cutoff): as node 0's source it is a mean teacher.
Node ``of`` must be a network that trains (not frozen, not virtual).

Feature edges: a second M×M gate matrix, ``feature_gates`` (None: every feature edge cutoff),
with the same four gates, for attention transfer between the outputs of stage
``feature_stage`` (timm's ``forward_intermediates`` index; -1 the last) of source and target,
weighted by ``feature_weight`` (:mod:`timm_dcl.features`). There is no label feature edge, so
its diagonal is cutoff; frozen and ensemble nodes only teach (their rows are cutoff), and an
ensemble node has no features of its own (its column is cutoff too).

A node may override the run's recipe for itself (``lr``, ``opt``, ``weight_decay``): a
pretrained teacher and a scratch student rarely share a learning rate.

JSON form (``to_dict``/``save``; the optional node keys appear only when set, and files
without them load unchanged)::

    {"version": 1, "temperature": 1.0,
     "nodes": [{"model": "resnet32", "model_kwargs": {}, "checkpoint": null, "frozen": false,
                "pretrained": false, "pretrained_file": null, "lr": null, "opt": null,
                "weight_decay": null}, ..., {"model": "ensemble", "members": [1, 2]}],
     "gates": [["through", "cutoff"], ["cutoff", "cutoff"]],
     "feature_gates": [["cutoff", "through"], ["cutoff", "cutoff"]],  # only with an open feature edge,
     "feature_stage": -1, "feature_weight": 500.0}                  # and then with these two
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .gates import GATE_NAMES, Gate, decode_gates, encode_gates, parse_gates
from .graph_node import EMA, ENSEMBLE, OPTIONAL_NODE_KEYS, Node, node_from_dict, validate_node

__all__ = ["Node", "Graph", "PRESETS", "FORMAT_VERSION", "ENSEMBLE", "EMA", "DEFAULT_FEATURE_WEIGHT"]

FORMAT_VERSION = 1
PRESETS = ("independent", "dml", "kd")

_THROUGH = GATE_NAMES[Gate.THROUGH]
_CUTOFF = GATE_NAMES[Gate.CUTOFF]
# optional per-node keys: weights and recipe overrides, written only when set
_GRAPH_KEYS = ("version", "temperature", "nodes", "gates", "feature_gates", "feature_stage", "feature_weight")
#: attention transfer's β / 2 with β = 1000 (Zagoruyko and Komodakis, 2017)
DEFAULT_FEATURE_WEIGHT = 500.0
# the trainer sets these for every node (one class count for all, no hub weights)


@dataclass
class Graph:
    """M nodes, an M×M gate matrix of names (``gates[t][s]``: s → t) and a temperature; optionally
    an M×M matrix of feature gates, the stage they read and their weight."""

    nodes: list[Node]
    gates: list[list[str]]
    temperature: float = 1.0
    feature_gates: Optional[list[list[str]]] = None
    feature_stage: int = -1
    feature_weight: float = DEFAULT_FEATURE_WEIGHT

    def __post_init__(self) -> None:
        if isinstance(self.nodes, (str, bytes, Mapping)) or not isinstance(self.nodes, Sequence):
            raise TypeError(f"nodes: expected a list of Node, got {type(self.nodes).__name__}")
        nodes = []
        for i, node in enumerate(self.nodes):
            if not isinstance(node, Node):
                raise TypeError(f"nodes[{i}]: expected a Node, got {type(node).__name__}")
            # the graph owns its nodes: inferring `frozen` must not touch the caller's objects
            nodes.append(replace(node, model_kwargs=copy.deepcopy(node.model_kwargs),
                                 members=list(node.members) if isinstance(node.members, (list, tuple)) else node.members))
        self.nodes = nodes
        self.validate()

    # ------------------------------------------------------------------ validation

    def _row_is_cutoff(self, t: int) -> bool:
        return all(g == _CUTOFF for g in self.gates[t])

    def validate(self) -> "Graph":
        """Check every field, errors naming the bad one; canonicalise the gate names and
        mark nodes with a checkpoint and an all-cutoff row frozen. Returns ``self``."""
        m = len(self.nodes)
        if m == 0:
            raise ValueError("nodes: a graph needs at least one node")
        # canonical lower-case names; accepts anything encode_gates does (names, Gate, codes)
        self.gates = decode_gates(encode_gates(self.gates, m))
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"temperature: expected a number, got {type(t).__name__}")
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature: must be finite and > 0, got {t!r}")
        self.temperature = float(t)
        for i, node in enumerate(self.nodes):
            validate_node(i, node)
            self._validate_members(i, node, m, self.nodes)
            if i > 0 and node.has_weights and self._row_is_cutoff(i):
                node.frozen = True
        for i, node in enumerate(self.nodes):
            where = f"nodes[{i}]"
            if node.is_ensemble:
                self._validate_ensemble(i, node)
            elif node.is_ema:
                self._validate_ema(i, node)
            elif node.frozen:
                if i == 0:
                    raise ValueError(f"{where}.frozen: node 0 is the target and can never be frozen")
                if not node.has_weights:
                    raise ValueError(f"{where}.checkpoint: node {i} is frozen, so it needs a checkpoint "
                                     "of a pre-trained run or a pretrained file")
                bad = [s for s, g in enumerate(self.gates[i]) if g != _CUTOFF]
                if bad:
                    s = bad[0]
                    raise ValueError(
                        f"gates[{i}]: node {i} is frozen (it learns nothing), so its gate row must be all "
                        f"cutoff, but gates[{i}][{s}] is {self.gates[i][s]!r}")
            elif self._row_is_cutoff(i):
                if i == 0:
                    raise ValueError("gates[0]: node 0 (the target) has an all-cutoff gate row, so it "
                                     "would learn nothing")
                raise ValueError(
                    f"gates[{i}]: node {i} has an all-cutoff gate row, so it learns nothing: give it a "
                    f"checkpoint (nodes[{i}].checkpoint) or a pretrained file to use it as a frozen "
                    "pre-trained teacher")
        self._validate_features()
        return self

    def _validate_features(self) -> None:
        m = len(self.nodes)
        stage, weight = self.feature_stage, self.feature_weight
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise TypeError(f"feature_stage: expected an integer stage index, got {stage!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"feature_weight: expected a number, got {type(weight).__name__}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"feature_weight: must be finite and ≥ 0, got {weight!r}")
        self.feature_weight = float(weight)
        if self.feature_gates is None:
            return
        self.feature_gates = decode_gates(_encode_named(self.feature_gates, m, "feature_gates"))
        for t in range(m):
            if self.feature_gates[t][t] != _CUTOFF:
                raise ValueError(f"feature_gates[{t}][{t}]: the diagonal must be cutoff (a label has no features), "
                                 f"got {self.feature_gates[t][t]!r}")
        for i, node in enumerate(self.nodes):
            if not (node.frozen or node.is_virtual):
                continue
            kind = "an ensemble" if node.is_ensemble else "an EMA node"
            what = "frozen (it learns nothing)" if node.frozen else f"{kind} (it learns nothing)"
            bad = [s for s, g in enumerate(self.feature_gates[i]) if g != _CUTOFF]
            if bad:
                raise ValueError(f"feature_gates[{i}]: node {i} is {what}, so its feature gate row must be all "
                                 f"cutoff, but feature_gates[{i}][{bad[0]}] is {self.feature_gates[i][bad[0]]!r}")
            if node.is_virtual:
                bad = [t for t in range(m) if self.feature_gates[t][i] != _CUTOFF]
                if bad:
                    raise ValueError(f"feature_gates[{bad[0]}][{i}]: node {i} is {kind}, which has no features "
                                     "of its own to teach with: its feature gate column must be all cutoff")
        if not self.has_feature_edges:
            self.feature_gates = None  # all cutoff is no feature edge at all: one canonical form

    @property
    def has_feature_edges(self) -> bool:
        return self.feature_gates is not None and any(g != _CUTOFF for row in self.feature_gates for g in row)

    @property
    def feature_nodes(self) -> tuple[int, ...]:
        """The nodes at either end of an open feature edge (their forward also returns features)."""
        if not self.has_feature_edges:
            return ()
        m = len(self.nodes)
        return tuple(i for i in range(m) if any(self.feature_gates[i][s] != _CUTOFF or self.feature_gates[s][i]
                                                != _CUTOFF for s in range(m)))

    @property
    def feature_gate_codes(self) -> tuple[int, ...]:
        """Flat row-major integer codes of the feature gates (all cutoff when there are none)."""
        m = len(self.nodes)
        if self.feature_gates is None:
            return (int(Gate.CUTOFF),) * (m * m)
        return encode_gates(self.feature_gates, m)

    def _check_virtual(self, i: int, node: Node, no_weights: str, is_what: str) -> None:
        """A virtual node (ensemble, EMA) is neither frozen nor taught: its row is all cutoff."""
        if node.frozen:
            raise ValueError(f"nodes[{i}].frozen: {no_weights}, so it cannot be frozen")
        bad = [s for s, g in enumerate(self.gates[i]) if g != _CUTOFF]
        if bad:
            raise ValueError(f"gates[{i}]: node {i} {is_what} (it learns nothing), so its gate row must be "
                             f"all cutoff, but gates[{i}][{bad[0]}] is {self.gates[i][bad[0]]!r}")

    def _validate_ensemble(self, i: int, node: Node) -> None:
        where = f"nodes[{i}]"
        self._check_virtual(i, node, "an ensemble node has no weights", "is an ensemble")
        members = self.ensemble_members(i)
        if not members:
            raise ValueError(f"{where}.members: an ensemble needs at least 1 member, and the graph has no "
                             "non-ensemble node" if node.members is None else
                             f"{where}.members: an ensemble needs at least 1 member, got []")

    def _validate_ema(self, i: int, node: Node) -> None:
        where = f"nodes[{i}]"
        m = len(self.nodes)
        self._check_virtual(i, node, "an EMA node has no weights of its own", f"is the EMA of node {node.of}")
        s = node.of
        if not 0 <= s < m:
            raise ValueError(f"{where}.of: node {s} is out of range (the graph has nodes 0..{m - 1})")
        source = self.nodes[s]
        if source.is_virtual or source.frozen:
            what = "virtual" if source.is_virtual else "frozen"
            raise ValueError(f"{where}.of: node {s} ({source.model}) is {what}, not a trainable node: "
                             "an EMA node averages the weights of a network that trains")

    @staticmethod
    def _validate_members(i: int, node: Node, m: int, nodes: Sequence[Node]) -> None:
        where = f"nodes[{i}].members"
        if node.members is None:
            return
        if not node.is_ensemble:
            raise ValueError(f"{where}: only an ensemble node (model {ENSEMBLE!r}) has members, "
                             f"node {i} is {node.model!r}")
        if isinstance(node.members, (str, bytes)) or not isinstance(node.members, Sequence):
            raise TypeError(f"{where}: expected a list of node indices, got {type(node.members).__name__}")
        seen = set()
        for s in node.members:
            if isinstance(s, bool) or not isinstance(s, int):
                raise TypeError(f"{where}: expected node indices, got {s!r}")
            if not 0 <= s < m:
                raise ValueError(f"{where}: node {s} is out of range (the graph has nodes 0..{m - 1})")
            if s in seen:
                raise ValueError(f"{where}: node {s} is listed twice")
            if nodes[s].is_ensemble:
                raise ValueError(f"{where}: node {s} is itself an ensemble; an ensemble of ensembles is not "
                                 "supported (list the networks themselves)")
            if nodes[s].is_ema:
                raise ValueError(f"{where}: node {s} is an EMA node; an ensemble's members are networks")
            seen.add(s)
        node.members = [int(s) for s in node.members]

    def ensemble_members(self, i: int) -> tuple[int, ...]:
        """The nodes whose logits node ``i`` (an ensemble) averages."""
        node = self.nodes[i]
        if not node.is_ensemble:
            raise ValueError(f"node {i} ({node.model}) is not an ensemble")
        if node.members is None:
            return tuple(s for s, n in enumerate(self.nodes) if not n.is_virtual)
        return tuple(node.members)

    def ema_source(self, i: int) -> int:
        """The node whose EMA node ``i`` (an EMA node) is."""
        node = self.nodes[i]
        if not node.is_ema:
            raise ValueError(f"node {i} ({node.model}) is not an EMA node")
        return int(node.of)


    def check_models(self) -> "Graph":
        """Check that every node's model is a timm model (ours included). Returns ``self``."""
        import timm

        from . import models  # noqa: F401  (registers the CIFAR networks)

        for i, node in enumerate(self.nodes):
            if node.is_virtual:
                continue
            if not timm.is_model(node.model):
                close = difflib.get_close_matches(node.model, timm.list_models(), n=5, cutoff=0.6)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise ValueError(f"nodes[{i}].model: unknown timm model {node.model!r}{hint}")
        return self

    # ------------------------------------------------------------------ properties

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def frozen_nodes(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.nodes) if n.frozen)

    @property
    def trainable_nodes(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.nodes) if not n.frozen and not n.is_virtual)

    @property
    def ensemble_nodes(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.nodes) if n.is_ensemble)

    @property
    def ema_nodes(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.nodes) if n.is_ema)

    @property
    def reference_model(self) -> str:
        """The model that decides the input size and evaluation crop: node 0's, or, when node
        0 is an ensemble, its first member's (an EMA node: its network's)."""
        first = self.nodes[0]
        return self.nodes[self.ensemble_members(0)[0] if first.is_ensemble else first.of if first.is_ema else 0].model

    @property
    def gate_codes(self) -> tuple[int, ...]:
        """Flat row-major integer codes, as the loss ops take them."""
        return encode_gates(self.gates, len(self.nodes))

    # ------------------------------------------------------------------ construction

    @classmethod
    def preset(
            cls,
            name: str,
            models: Sequence[str],
            *,
            checkpoints: Optional[Sequence[Optional[str]]] = None,
            temperature: Optional[float] = None,
            nodes: Optional[Sequence[Node]] = None,
    ) -> "Graph":
        """A classic graph: ``independent`` (labels only), ``dml`` (all through, T=1) or
        ``kd`` (node 1 a frozen teacher from its checkpoint, T=2). ``nodes`` gives the nodes
        whole (weights, recipe overrides) instead of ``models`` and ``checkpoints``."""
        key = name.strip().lower() if isinstance(name, str) else name
        if key not in PRESETS:
            hint = difflib.get_close_matches(str(name), PRESETS, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"preset: unknown preset {name!r}{extra}; presets are {', '.join(PRESETS)}")
        models = _model_list(models)
        m = len(models)
        checkpoints = _checkpoint_list(checkpoints, m)
        if nodes is None:
            nodes = [Node(model, checkpoint=ckpt) for model, ckpt in zip(models, checkpoints)]
        elif len(nodes) != m:
            raise ValueError(f"nodes: got {len(nodes)} nodes for {m} models")
        if key == "independent":
            gates = [[_THROUGH if s == t else _CUTOFF for s in range(m)] for t in range(m)]
            default_t = 1.0
        elif key == "dml":
            gates = [[_THROUGH] * m for _ in range(m)]
            default_t = 1.0
        else:
            if m != 2:
                raise ValueError(f"preset 'kd' needs exactly 2 models (student, teacher), got {m}")
            if not nodes[1].has_weights:
                raise ValueError("preset 'kd': node 1 (the frozen teacher) needs a checkpoint or pretrained weights")
            gates = [[_THROUGH, _THROUGH], [_CUTOFF, _CUTOFF]]
            default_t = 2.0
        # a virtual node learns nothing: whatever the preset opens, its row stays cutoff
        gates = [[_CUTOFF] * m if nodes[t].is_virtual else row for t, row in enumerate(gates)]
        return cls(list(nodes), gates, default_t if temperature is None else temperature)

    @classmethod
    def from_cli(
            cls,
            models: Sequence[str],
            gates: Optional[str] = None,
            preset: Optional[str] = None,
            checkpoints: Optional[Sequence[Optional[str]]] = None,
            temperature: Optional[float] = None,
            nodes: Optional[Sequence[Node]] = None,
    ) -> "Graph":
        """The graph of command-line options: a gate string (``"through,cutoff;cutoff,cutoff"``)
        or a preset (default ``dml``). Checkpoint slots that are empty or ``none`` mean no
        checkpoint; a node with a checkpoint and an all-cutoff row becomes frozen."""
        if gates is not None and preset is not None:
            raise ValueError("give either gates or a preset, not both")
        models = _model_list(models)
        if gates is None:
            return cls.preset(preset or "dml", models, checkpoints=checkpoints, temperature=temperature,
                              nodes=nodes)
        if not isinstance(gates, str):
            raise TypeError(f"gates: expected a string like 'through,cutoff;cutoff,through', "
                            f"got {type(gates).__name__}")
        matrix = parse_gates(gates, len(models))
        if nodes is None:
            ckpts = _checkpoint_list(checkpoints, len(models))
            nodes = [Node(model, checkpoint=ckpt) for model, ckpt in zip(models, ckpts)]
        return cls(list(nodes), matrix, 1.0 if temperature is None else temperature)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "temperature": self.temperature,
            "nodes": [
                {
                    "model": n.model,
                    "model_kwargs": copy.deepcopy(n.model_kwargs),
                    "checkpoint": n.checkpoint,
                    "frozen": n.frozen,
                    # `is`, not `in`: 0 == False, and `of: 0` or `weight_decay: 0.0` must be written
                    **{k: copy.deepcopy(getattr(n, k)) for k in OPTIONAL_NODE_KEYS
                       if getattr(n, k) is not None and getattr(n, k) is not False},
                }
                for n in self.nodes
            ],
            "gates": [list(row) for row in self.gates],
            # written only with an open feature edge: a logit-only graph's file is as before
            **({"feature_gates": [list(row) for row in self.feature_gates], "feature_stage": self.feature_stage,
                "feature_weight": self.feature_weight} if self.has_feature_edges else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Graph":
        """Inverse of :meth:`to_dict`; strict: unknown keys and wrong types are errors."""
        if not isinstance(d, Mapping):
            raise TypeError(f"graph: expected a JSON object, got {type(d).__name__}")
        unknown = [k for k in d if k not in _GRAPH_KEYS]
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key; a graph has {', '.join(_GRAPH_KEYS)}")
        version = d.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"version: unsupported graph format {version!r} (this build reads {FORMAT_VERSION})")
        for key in ("nodes", "gates"):
            if key not in d:
                raise ValueError(f"{key}: missing")
        raw_nodes = d["nodes"]
        if not isinstance(raw_nodes, list):
            raise TypeError(f"nodes: expected a list, got {type(raw_nodes).__name__}")
        nodes = [node_from_dict(i, raw) for i, raw in enumerate(raw_nodes)]
        gates = d["gates"]
        if not isinstance(gates, list) or not all(isinstance(row, list) for row in gates):
            raise TypeError("gates: expected a list of lists of gate names")
        for t, row in enumerate(gates):
            for s, g in enumerate(row):
                if not isinstance(g, str):
                    raise TypeError(f"gates[{t}][{s}]: expected a gate name, got {type(g).__name__}")
        temperature = d.get("temperature", 1.0)
        feature_gates = d.get("feature_gates")
        if feature_gates is not None and (not isinstance(feature_gates, list)
                                          or not all(isinstance(row, list) for row in feature_gates)):
            raise TypeError("feature_gates: expected a list of lists of gate names")
        return cls(nodes, gates, temperature, feature_gates=feature_gates,
                   feature_stage=d.get("feature_stage", -1),
                   feature_weight=d.get("feature_weight", DEFAULT_FEATURE_WEIGHT))

    def save(self, path: Union[str, os.PathLike]) -> Path:
        from .safe_io import write_text  # whole or not at all: a resume reads it back

        path = Path(path)
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Graph":
        """Read a graph JSON file; errors are prefixed with the file name."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)}: invalid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{os.fspath(path)}: {e}") from None

    # ------------------------------------------------------------------ display

    def describe(self) -> str:
        """A short text table of the graph, for logs."""
        m = len(self.nodes)
        lines = [f"knowledge transfer graph: {m} node{'s' if m != 1 else ''}, T={self.temperature:g}"]
        names = [n.model + (f" {n.model_kwargs}" if n.model_kwargs else "") for n in self.nodes]
        w = max(len("model"), *(len(s) for s in names))
        lines.append(f"  {'node':<5} {'model':<{w}}  {'role':<9} checkpoint")
        for i, (n, name) in enumerate(zip(self.nodes, names)):
            role = "target" if i == 0 else ("frozen" if n.frozen else "trainable")
            source = n.weights_source
            if n.is_ensemble:
                role = "ensemble" if i else "target"
                source = "mean of nodes " + "+".join(map(str, self.ensemble_members(i)))
            elif n.is_ema:
                role = "ema" if i else "target"
                source = f"EMA of node {n.of}"
            lines.append(f"  {i:<5} {name:<{w}}  {role:<9} {source}")
        lines.append("  gates (row t = learner, column s = source, diagonal = label):")
        gw = max(len(g) for g in GATE_NAMES)
        lines.append("  " + " " * 5 + " ".join(f"{s:>{gw}}" for s in range(m)))
        for t, row in enumerate(self.gates):
            lines.append(f"  {t:<5}" + " ".join(f"{g:>{gw}}" for g in row))
        if self.has_feature_edges:
            lines.append(f"  feature gates (attention transfer at stage {self.feature_stage}, "
                         f"weight {self.feature_weight:g}; row t = learner, column s = source):")
            lines.append("  " + " " * 5 + " ".join(f"{s:>{gw}}" for s in range(m)))
            for t, row in enumerate(self.feature_gates):
                lines.append(f"  {t:<5}" + " ".join(f"{g:>{gw}}" for g in row))
        return "\n".join(lines)


def _encode_named(gates, m: int, name: str) -> tuple[int, ...]:
    """encode_gates with its messages about ``gates`` renamed to ``name``."""
    try:
        return encode_gates(gates, m)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("gates", name)) from None


def _model_list(models: Sequence[str]) -> list[str]:
    if isinstance(models, str) or not isinstance(models, Sequence):
        raise TypeError(f"models: expected a list of model names, got {type(models).__name__}")
    out = list(models)
    if not out:
        raise ValueError("models: a graph needs at least one model")
    for i, name in enumerate(out):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"models[{i}]: expected a non-empty model name, got {name!r}")
    return [name.strip() for name in out]


def _checkpoint_list(checkpoints: Optional[Sequence[Optional[str]]], m: int) -> list[Optional[str]]:
    if checkpoints is None:
        return [None] * m
    if isinstance(checkpoints, str) or not isinstance(checkpoints, Sequence):
        raise TypeError(f"checkpoints: expected a list with one path (or None) per node, "
                        f"got {type(checkpoints).__name__}")
    if len(checkpoints) != m:
        raise ValueError(f"checkpoints: got {len(checkpoints)} entries for {m} nodes (use None for no checkpoint)")
    out: list[Optional[str]] = []
    for i, c in enumerate(checkpoints):
        if isinstance(c, os.PathLike):
            c = os.fspath(c)
        if c is not None and not isinstance(c, str):
            raise TypeError(f"checkpoints[{i}]: expected a path or None, got {type(c).__name__}")
        if c is not None and c.strip().lower() in ("", "none"):
            c = None
        out.append(c)
    return out
