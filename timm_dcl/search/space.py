"""The search space (SPEC §6): node models and edge gates, canonical graphs, the baselines.

A trial samples the model of every node but node 0 and the gate of each of the M² edges.
Two samples can describe the same graph:

- a correct gate on the diagonal keeps the samples whose *label* is right, i.e. all of
  them: it is a through gate (SPEC §2);
- nodes 1…M−1 are interchangeable: relabelling them (models, rows and columns together)
  trains the same graph.

:func:`canonical_graph` maps every sample to one representative of its class, so the search
can store, report and recognise graphs by what they train, not by how they were drawn.
(``canonical_gates`` could move to :class:`timm_dcl.graph.Graph`; it lives here because only
the search needs it so far.)
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..gates import GATE_NAMES, Gate
from ..graph import Graph, Node
from ..pretrained import find_pretrained

__all__ = ["DEFAULT_CANDIDATES", "InvalidGraph", "SearchSpace", "Baseline", "CanonicalGraph",
           "canonical_gates", "canonical_graph", "graph_text", "MAX_PERMUTED_NODES"]

#: The models the paper searched over for nodes 1…M−1 (SPEC §6).
DEFAULT_CANDIDATES = ("resnet32", "resnet110", "wrn28_2")
_THROUGH = GATE_NAMES[Gate.THROUGH]
_CUTOFF = GATE_NAMES[Gate.CUTOFF]
_CORRECT = GATE_NAMES[Gate.CORRECT]
#: Relabellings of nodes 1…M−1 are tried exhaustively up to this many nodes ((M−1)! orders);
#: larger graphs are canonical up to the diagonal only (the paper's graphs have M ≤ 5).
MAX_PERMUTED_NODES = 7


class InvalidGraph(ValueError):
    """A sampled graph that cannot be trained (an all-cutoff row without a pre-trained checkpoint)."""


def canonical_gates(gates: Sequence[Sequence[str]]) -> list[list[str]]:
    """``gates`` with every correct gate on the diagonal written as through (SPEC §2)."""
    return [[_THROUGH if (s == t and g == _CORRECT) else g for s, g in enumerate(row)] for t, row in enumerate(gates)]


@dataclass(frozen=True)
class CanonicalGraph:
    """One representative of the graphs that train the same thing; ``key`` identifies it."""

    models: tuple[str, ...]
    gates: tuple[tuple[str, ...], ...]

    @property
    def gates_text(self) -> str:
        """The CLI form (``--gates``): rows split by ``;``."""
        return ";".join(",".join(row) for row in self.gates)

    @property
    def models_text(self) -> str:
        return ",".join(self.models)

    @property
    def key(self) -> str:
        return f"{self.models_text}|{self.gates_text}"

    @property
    def id(self) -> str:
        """A short stable name (run folders of the report)."""
        return hashlib.sha1(self.key.encode()).hexdigest()[:12]


def canonical_graph(models: Sequence[str], gates: Sequence[Sequence[str]]) -> CanonicalGraph:
    """The canonical form of the graph with node models ``models`` (node 0 first) and ``gates``.

    Diagonal correct → through; then, of all relabellings of nodes 1…M−1, the one whose
    (models, gates) is smallest. Node 0 stays node 0: it is the target.
    """
    m = len(models)
    gates = canonical_gates(gates)
    if m > MAX_PERMUTED_NODES:
        orders: Any = [tuple(range(1, m))]
    else:
        orders = itertools.permutations(range(1, m))
    best = None
    for rest in orders:
        order = (0, *rest)
        cand = (tuple(models[i] for i in order), tuple(tuple(gates[t][s] for s in order) for t in order))
        if best is None or cand < best:
            best = cand
    return CanonicalGraph(*best)


def graph_text(graph: Graph) -> str:
    models = ",".join(n.model + ("*" if n.frozen else "") for n in graph.nodes)
    gates = ";".join(",".join(row) for row in graph.gates)
    return f"{models}  [{gates}]"


def _check_model(name: str, what: str) -> str:
    import timm

    from .. import models  # noqa: F401  (registers the CIFAR networks with timm)

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what}: expected a timm model name, got {name!r}")
    name = name.strip()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{what}: unknown timm model {name!r}{hint}")
    return name


@dataclass(frozen=True)
class Baseline:
    """A classic graph the search and the report measure the searched ones against."""

    name: str  # independent, dml or kd
    params: dict  # the trial parameters that draw it

    @property
    def models(self) -> list[str]:
        return [self.params[k] for k in sorted((k for k in self.params if k.startswith("model_")),
                                               key=lambda k: int(k.split("_")[1]))]


@dataclass(frozen=True)
class SearchSpace:
    """The models of nodes 1…M−1 (from ``candidates``) and the gates of all M² edges.

    Parameters are named ``model_<n>`` and ``gate_<t>_<s>`` (the edge from source s into
    target t, as in ``gates[t][s]``). Node 0 is always ``target_model`` and always trained.
    A node n ≥ 1 whose sampled row is all cutoff is a frozen pre-trained teacher when
    ``pretrained_dir`` holds a checkpoint of its model on ``dataset``; otherwise the sample
    is invalid (:class:`InvalidGraph`).
    """

    num_nodes: int
    target_model: str = "resnet32"
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    dataset: str = "cifar100"
    pretrained_dir: Optional[str] = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        from ..ops import MAX_NODES

        m = self.num_nodes
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"--num-nodes must be an integer, got {type(m).__name__}")
        if m < 1:
            raise ValueError(f"--num-nodes must be ≥ 1, got {m}")
        if m > MAX_NODES:
            raise ValueError(f"--num-nodes must be ≤ {MAX_NODES} (the loss kernels' limit), got {m}")
        object.__setattr__(self, "target_model", _check_model(self.target_model, "--target-model"))
        if isinstance(self.candidates, str):
            raise TypeError("candidates must be a sequence of model names, not one string")
        candidates = tuple(_check_model(c, "--candidates") for c in self.candidates)
        if m > 1 and not candidates:
            raise ValueError("--candidates is empty: nodes 1…M−1 need at least one model to choose from")
        seen = set()
        for c in candidates:
            if c in seen:
                raise ValueError(f"--candidates lists {c!r} twice")
            seen.add(c)
        object.__setattr__(self, "candidates", candidates)
        if self.pretrained_dir is not None and not Path(self.pretrained_dir).is_dir():
            raise ValueError(f"--pretrained-dir {self.pretrained_dir}: not a directory")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"--temperature must be a finite number > 0, got {t!r}")

    # -- what a trial samples
    def param_names(self) -> list[str]:
        m = self.num_nodes
        return [f"model_{n}" for n in range(1, m)] + [f"gate_{t}_{s}" for t in range(m) for s in range(m)]

    def params(self, models: Sequence[str], gates: Sequence[Sequence[str]]) -> dict[str, str]:
        """The trial parameters that draw nodes 1…M−1 = ``models`` and ``gates``."""
        m = self.num_nodes
        out = {f"model_{n}": models[n - 1] for n in range(1, m)}
        out.update({f"gate_{t}_{s}": gates[t][s] for t in range(m) for s in range(m)})
        return out

    def sample(self, trial) -> Graph:
        """Suggest every parameter of ``trial`` and build its graph (may raise InvalidGraph)."""
        models = [trial.suggest_categorical(f"model_{n}", self.candidates) for n in range(1, self.num_nodes)]
        gates = [[trial.suggest_categorical(f"gate_{t}_{s}", GATE_NAMES) for s in range(self.num_nodes)]
                 for t in range(self.num_nodes)]
        return self.build(models, gates)

    def split_params(self, params: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        """Nodes 1…M−1's models and the gate matrix of a trial's parameters."""
        missing = [p for p in self.param_names() if p not in params]
        if missing:
            raise ValueError(f"trial parameters lack {', '.join(missing[:4])}: not a trial of this search space")
        m = self.num_nodes
        return [params[f"model_{n}"] for n in range(1, m)], [[params[f"gate_{t}_{s}"] for s in range(m)]
                                                             for t in range(m)]

    def graph_from_params(self, params: dict[str, Any]) -> Graph:
        """The graph of a finished trial's parameters."""
        return self.build(*self.split_params(params))

    def canonical(self, params: dict[str, Any]) -> CanonicalGraph:
        models, gates = self.split_params(params)
        return canonical_graph([self.target_model, *models], gates)

    def canonical_build(self, params: dict[str, Any]) -> Graph:
        """The canonical representative of a trial's graph, ready to train."""
        c = self.canonical(params)
        return self.build(list(c.models[1:]), [list(row) for row in c.gates])

    def build(self, models: Sequence[str], gates: Sequence[Sequence[str]]) -> Graph:
        """Node 0 = the target, then ``models``; all-cutoff rows become frozen pre-trained nodes."""
        names = [self.target_model, *models]
        nodes = []
        for t, model in enumerate(names):
            if any(g != _CUTOFF for g in gates[t]):
                nodes.append(Node(model))
                continue
            if t == 0:
                raise InvalidGraph("node 0 (the target) has an all-cutoff gate row, so it would learn nothing")
            ckpt = find_pretrained(self.pretrained_dir, self.dataset, model)
            if ckpt is None:
                where = f"--pretrained-dir {self.pretrained_dir}" if self.pretrained_dir else "no --pretrained-dir"
                raise InvalidGraph(f"node {t} ({model}) has an all-cutoff gate row but {where} holds no "
                                   f"{model} checkpoint for {self.dataset}")
            nodes.append(Node(model, checkpoint=str(ckpt), frozen=True))
        return Graph(nodes, [list(row) for row in gates], self.temperature)

    def baselines(self) -> list[Baseline]:
        """The classic graphs of this node count, in the order the study runs them.

        independent (labels only; nodes 1…M−1 = the first candidate), DML (every gate
        through) with nodes 1…M−1 all one candidate, for each candidate, and KD (node 0 learns
        from the labels and frozen teachers, all one candidate) for each candidate that has a
        checkpoint in ``pretrained_dir``. KD uses the study's temperature, like every trial.
        Graphs that are canonically equal (one node: independent = DML) are listed once.
        """
        m = self.num_nodes
        first = self.candidates[0] if self.candidates else self.target_model
        out = [Baseline("independent", self.params([first] * (m - 1),
                                                   [[_THROUGH if s == t else _CUTOFF for s in range(m)]
                                                    for t in range(m)]))]
        for c in self.candidates or (self.target_model,):
            out.append(Baseline("dml", self.params([c] * (m - 1), [[_THROUGH] * m for _ in range(m)])))
        if m > 1:
            for c in self.candidates:
                if find_pretrained(self.pretrained_dir, self.dataset, c) is not None:
                    gates = [[_THROUGH] * m] + [[_CUTOFF] * m for _ in range(m - 1)]
                    out.append(Baseline("kd", self.params([c] * (m - 1), gates)))
        seen, unique = set(), []
        for b in out:
            key = self.canonical(b.params).key
            if key not in seen:
                seen.add(key)
                unique.append(b)
        return unique

    def settings(self) -> dict[str, Any]:
        """What must agree between the workers of one study (the checkpoint folder may not)."""
        return {"num_nodes": self.num_nodes, "target_model": self.target_model,
                "candidates": list(self.candidates), "dataset": self.dataset, "temperature": self.temperature}
