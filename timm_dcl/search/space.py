"""The search space (SPEC §6): node models and edge gates, canonical graphs, the baselines.

A trial samples the model of every node but node 0 and the gate of each of the M² edges;
optionally (``feature_edges``) the gate of each feature edge s → t, s ≠ t, too. Node 0 is
the target model, or (``ensemble_target``) the ensemble of nodes 1…M−1, which learns nothing:
its gate row is then not sampled. Two samples can describe the same graph:

- a correct gate on the diagonal keeps the samples whose *label* is right, i.e. all of
  them: it is a through gate (SPEC §2);
- a feature edge into a node that learns nothing (frozen, or an ensemble) or out of an
  ensemble (it has no features) trains nothing: it is a cutoff;
- nodes 1…M−1 are interchangeable: relabelling them (models, rows and columns of both gate
  matrices together) trains the same graph.

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
from ..graph import DEFAULT_FEATURE_WEIGHT, EMA, ENSEMBLE, Graph, Node
from ..pretrained import find_pretrained

__all__ = ["DEFAULT_CANDIDATES", "DEFAULT_TARGET", "InvalidGraph", "SearchSpace", "Baseline", "CanonicalGraph",
           "canonical_gates", "canonical_feature_gates", "canonical_graph", "graph_text", "split_key",
           "MAX_PERMUTED_NODES"]

#: The models the paper searched over for nodes 1…M−1 (SPEC §6).
DEFAULT_CANDIDATES = ("resnet32", "resnet110", "wrn28_2")
#: Node 0 of the paper's searches.
DEFAULT_TARGET = "resnet32"
_THROUGH = GATE_NAMES[Gate.THROUGH]
_CUTOFF = GATE_NAMES[Gate.CUTOFF]
_CORRECT = GATE_NAMES[Gate.CORRECT]
#: Relabellings of nodes 1…M−1 are tried exhaustively up to this many nodes ((M−1)! orders);
#: larger graphs are canonical up to the diagonal only (the paper's graphs have M ≤ 5).
MAX_PERMUTED_NODES = 7
#: What nodes 1…M−1 may draw besides the candidates with ``ema_sources``: the EMA of node 0 (a mean
#: teacher). Only node 0's: its index never changes under the relabellings of nodes 1…M−1.
EMA_SOURCE = f"{EMA}:0"


def _virtual(model: str) -> bool:
    """A drawn model that is no network: the ensemble node 0, or an EMA source."""
    return model == ENSEMBLE or model == EMA_SOURCE


class InvalidGraph(ValueError):
    """A sampled graph that cannot be trained (an all-cutoff row without a pre-trained checkpoint)."""


def canonical_gates(gates: Sequence[Sequence[str]]) -> list[list[str]]:
    """``gates`` with every correct gate on the diagonal written as through (SPEC §2)."""
    return [[_THROUGH if (s == t and g == _CORRECT) else g for s, g in enumerate(row)] for t, row in enumerate(gates)]


def canonical_feature_gates(models: Sequence[str], gates: Sequence[Sequence[str]],
                            feature_gates: Optional[Sequence[Sequence[str]]]) -> list[list[str]]:
    """``feature_gates`` (None: all cutoff) with every edge that trains nothing cut.

    Sampling every feature edge and cutting these afterwards keeps the parameters of a trial
    the same whatever it drew, and makes the graphs that differ only in such edges one graph:
    the diagonal (there is no label feature), the rows of nodes that learn nothing (an
    all-cutoff logit row: frozen, or an ensemble) and the columns of ensembles (no features).
    """
    m = len(models)
    out = []
    for t in range(m):
        learns = not _virtual(models[t]) and any(g != _CUTOFF for g in gates[t])
        out.append([feature_gates[t][s] if (feature_gates is not None and learns and s != t
                                            and not _virtual(models[s])) else _CUTOFF for s in range(m)])
    return out


def _rows_text(rows: Sequence[Sequence[str]]) -> str:
    return ";".join(",".join(row) for row in rows)


@dataclass(frozen=True)
class CanonicalGraph:
    """One representative of the graphs that train the same thing; ``key`` identifies it."""

    models: tuple[str, ...]
    gates: tuple[tuple[str, ...], ...]
    feature_gates: Optional[tuple[tuple[str, ...], ...]] = None  # None: no open feature edge

    def __post_init__(self) -> None:
        fg = self.feature_gates
        if fg is not None and all(g == _CUTOFF for row in fg for g in row):
            object.__setattr__(self, "feature_gates", None)  # one form for "no feature edge"

    @property
    def gates_text(self) -> str:
        """The CLI form (``--gates``): rows split by ``;``."""
        return _rows_text(self.gates)

    @property
    def feature_gates_text(self) -> str:
        """The feature gates in the same form; empty without an open feature edge."""
        return "" if self.feature_gates is None else _rows_text(self.feature_gates)

    @property
    def models_text(self) -> str:
        return ",".join(self.models)

    @property
    def key(self) -> str:
        # Studies and report run folders on disk are found by the key (and the id hashed from
        # it): a graph without feature edges keeps the key it had before they existed.
        key = f"{self.models_text}|{self.gates_text}"
        return key if self.feature_gates is None else f"{key}|{self.feature_gates_text}"

    @property
    def id(self) -> str:
        """A short stable name (run folders of the report)."""
        return hashlib.sha1(self.key.encode()).hexdigest()[:12]


def split_key(key: str) -> tuple[str, str, str]:
    """A key's models, gates and feature gates (empty without feature edges), in CLI form."""
    models, _, rest = key.partition("|")
    gates, _, features = rest.partition("|")
    return models, gates, features


def canonical_graph(models: Sequence[str], gates: Sequence[Sequence[str]],
                    feature_gates: Optional[Sequence[Sequence[str]]] = None) -> CanonicalGraph:
    """The canonical form of the graph with node models ``models`` (node 0 first), ``gates``
    and ``feature_gates`` (None: no feature edge).

    Diagonal correct → through, feature edges that train nothing → cutoff; then, of all
    relabellings of nodes 1…M−1, the one whose (models, gates, feature gates) is smallest.
    Node 0 stays node 0: it is the target.
    """
    m = len(models)
    # an EMA source learns nothing: whatever its row drew, it is cut
    gates = canonical_gates([[_CUTOFF] * m if models[t] == EMA_SOURCE else row for t, row in enumerate(gates)])
    features = canonical_feature_gates(models, gates, feature_gates)
    if m > MAX_PERMUTED_NODES:
        orders: Any = [tuple(range(1, m))]
    else:
        orders = itertools.permutations(range(1, m))
    best = None
    for rest in orders:
        order = (0, *rest)
        # feature gates compare last: without feature edges they are all equal, so the
        # representative (and its key) is the one chosen before feature edges existed
        cand = (tuple(models[i] for i in order), tuple(tuple(gates[t][s] for s in order) for t in order),
                tuple(tuple(features[t][s] for s in order) for t in order))
        if best is None or cand < best:
            best = cand
    return CanonicalGraph(*best)


def graph_text(graph: Graph) -> str:
    models = ",".join(n.model + ("*" if n.frozen else f":{n.of}" if n.is_ema else "") for n in graph.nodes)
    text = f"{models}  [{_rows_text(graph.gates)}]"
    return text + (f"  features [{_rows_text(graph.feature_gates)}]" if graph.has_feature_edges else "")


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

    name: str  # independent, dml, kd or dml+at
    params: dict  # the trial parameters that draw it

    @property
    def models(self) -> list[str]:
        return [self.params[k] for k in sorted((k for k in self.params if k.startswith("model_")),
                                               key=lambda k: int(k.split("_")[1]))]


@dataclass(frozen=True)
class SearchSpace:
    """The models of nodes 1…M−1 (from ``candidates``) and the gates of all M² edges.

    Parameters are named ``model_<n>`` and ``gate_<t>_<s>`` (the edge from source s into
    target t, as in ``gates[t][s]``). Node 0 is always ``target_model`` (default resnet32) and
    always trained. A node n ≥ 1 whose sampled row is all cutoff is a frozen pre-trained
    teacher when ``pretrained_dir`` holds a checkpoint of its model on ``dataset``; otherwise
    the sample is invalid (:class:`InvalidGraph`).

    ``ensemble_target``: node 0 is instead the ensemble of nodes 1…M−1 (``target_model`` is
    then ``ensemble`` and may not be given otherwise); it learns nothing, so no ``gate_0_<s>``
    is sampled and its row is cutoff. ``feature_edges``: the feature gates are sampled too,
    ``fgate_<t>_<s>`` for s ≠ t (not into or out of an ensemble node 0); the ones into a node
    that turns out frozen are cut when the graph is built (:func:`canonical_feature_gates`).
    """

    num_nodes: int
    target_model: Optional[str] = None  # None: DEFAULT_TARGET, or the ensemble with ensemble_target
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    dataset: str = "cifar100"
    pretrained_dir: Optional[str] = None
    temperature: float = 1.0
    ensemble_target: bool = False
    feature_edges: bool = False
    feature_weight: float = DEFAULT_FEATURE_WEIGHT
    ema_sources: bool = False  # nodes 1…M−1 may be the EMA of node 0 (EMA_SOURCE), a mean teacher

    def __post_init__(self) -> None:
        from ..ops import MAX_NODES

        m = self.num_nodes
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"--num-nodes must be an integer, got {type(m).__name__}")
        if m < 1:
            raise ValueError(f"--num-nodes must be ≥ 1, got {m}")
        if m > MAX_NODES:
            raise ValueError(f"--num-nodes must be ≤ {MAX_NODES} (the loss kernels' limit), got {m}")
        for flag in ("ensemble_target", "feature_edges", "ema_sources"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.ensemble_target:
            if self.target_model not in (None, ENSEMBLE):
                raise ValueError(f"--target-model {self.target_model} cannot be used with --ensemble-target: node 0 is "
                                 "the ensemble of nodes 1…M−1, whose models come from --candidates")
            if m < 2:
                raise ValueError(f"--ensemble-target needs --num-nodes ≥ 2 (node 0 is the ensemble of nodes 1…M−1; "
                                 f"3 or more to ensemble several networks), got {m}")
            object.__setattr__(self, "target_model", ENSEMBLE)
        else:
            object.__setattr__(self, "target_model", _check_model(
                DEFAULT_TARGET if self.target_model is None else self.target_model, "--target-model"))
        if self.ema_sources and self.ensemble_target:
            raise ValueError("--ema-sources draws the EMA of node 0, which --ensemble-target makes an ensemble "
                             "(it has no weights to average): use one of them")
        if self.ema_sources and m < 2:
            raise ValueError(f"--ema-sources needs --num-nodes ≥ 2 (nodes 1…M−1 may be node 0's EMA), got {m}")
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
        w = self.feature_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"--feature-weight must be a finite number ≥ 0, got {w!r}")
        object.__setattr__(self, "feature_weight", float(w))

    @property
    def input_model(self) -> str:
        """The model whose input size and crop the data takes: node 0's, or an ensemble's first candidate."""
        return self.candidates[0] if self.ensemble_target else self.target_model

    @property
    def choices(self) -> tuple[str, ...]:
        """What nodes 1…M−1 draw: the candidates, and with ``ema_sources`` node 0's EMA."""
        return self.candidates + ((EMA_SOURCE,) if self.ema_sources else ())

    # -- what a trial samples
    def _learners(self) -> range:
        """The nodes whose gate rows are sampled (an ensemble node 0 learns nothing)."""
        return range(1 if self.ensemble_target else 0, self.num_nodes)

    def _feature_edges(self) -> list[tuple[int, int]]:
        """The sampled feature edges (t, s): s ≠ t, and not into or out of an ensemble node 0."""
        if not self.feature_edges:
            return []
        nodes = self._learners()  # an ensemble node 0 has no features and learns nothing: neither end
        return [(t, s) for t in nodes for s in nodes if s != t]

    def param_names(self) -> list[str]:
        m = self.num_nodes
        return ([f"model_{n}" for n in range(1, m)] + [f"gate_{t}_{s}" for t in self._learners() for s in range(m)]
                + [f"fgate_{t}_{s}" for t, s in self._feature_edges()])

    def params(self, models: Sequence[str], gates: Sequence[Sequence[str]],
               feature_gates: Optional[Sequence[Sequence[str]]] = None) -> dict[str, str]:
        """The trial parameters that draw nodes 1…M−1 = ``models``, ``gates`` and ``feature_gates``
        (None: all cutoff; ignored unless the space samples feature edges)."""
        m = self.num_nodes
        out = {f"model_{n}": models[n - 1] for n in range(1, m)}
        out.update({f"gate_{t}_{s}": gates[t][s] for t in self._learners() for s in range(m)})
        out.update({f"fgate_{t}_{s}": _CUTOFF if feature_gates is None else feature_gates[t][s]
                    for t, s in self._feature_edges()})
        return out

    def sample(self, trial) -> Graph:
        """Suggest every parameter of ``trial`` and build its graph (may raise InvalidGraph)."""
        m = self.num_nodes
        # the order of the suggestions is the order before the modes existed: a seeded sampler
        # draws the same graphs as it did
        models = [trial.suggest_categorical(f"model_{n}", self.choices) for n in range(1, m)]
        gates = [[_CUTOFF] * m for _ in range(m)]
        for t in self._learners():
            gates[t] = [trial.suggest_categorical(f"gate_{t}_{s}", GATE_NAMES) for s in range(m)]
        features = None
        if self.feature_edges:
            features = [[_CUTOFF] * m for _ in range(m)]
            for t, s in self._feature_edges():
                features[t][s] = trial.suggest_categorical(f"fgate_{t}_{s}", GATE_NAMES)
        return self.build(models, gates, features)

    def split_params(self, params: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        """Nodes 1…M−1's models and the gate matrix of a trial's parameters."""
        missing = [p for p in self.param_names() if p not in params]
        if missing:
            raise ValueError(f"trial parameters lack {', '.join(missing[:4])}: not a trial of this search space")
        m = self.num_nodes
        gates = [[params.get(f"gate_{t}_{s}", _CUTOFF) for s in range(m)] for t in range(m)]
        return [params[f"model_{n}"] for n in range(1, m)], gates

    def feature_params(self, params: dict[str, Any]) -> Optional[list[list[str]]]:
        """The feature gate matrix of a trial's parameters (None when the space samples none)."""
        if not self.feature_edges:
            return None
        m = self.num_nodes
        return [[params.get(f"fgate_{t}_{s}", _CUTOFF) for s in range(m)] for t in range(m)]

    def graph_from_params(self, params: dict[str, Any]) -> Graph:
        """The graph of a finished trial's parameters."""
        return self.build(*self.split_params(params), self.feature_params(params))

    def canonical(self, params: dict[str, Any]) -> CanonicalGraph:
        models, gates = self.split_params(params)
        return canonical_graph([self.target_model, *models], gates, self.feature_params(params))

    def build_canonical(self, canon: CanonicalGraph) -> Graph:
        """The graph of a canonical form, ready to train."""
        features = None if canon.feature_gates is None else [list(row) for row in canon.feature_gates]
        return self.build(list(canon.models[1:]), [list(row) for row in canon.gates], features)

    def canonical_build(self, params: dict[str, Any]) -> Graph:
        """The canonical representative of a trial's graph, ready to train."""
        return self.build_canonical(self.canonical(params))

    def build(self, models: Sequence[str], gates: Sequence[Sequence[str]],
              feature_gates: Optional[Sequence[Sequence[str]]] = None) -> Graph:
        """Node 0 = the target (or the ensemble), then ``models``; all-cutoff rows become frozen
        pre-trained nodes; feature edges that would train nothing are cut."""
        names = [self.target_model, *models]
        nodes = []
        for t, model in enumerate(names):
            if t == 0 and self.ensemble_target:
                if any(g != _CUTOFF for g in gates[0]):
                    raise ValueError("gates[0]: node 0 is the ensemble, which learns nothing: its row must be "
                                     "all cutoff")
                nodes.append(Node(ENSEMBLE))
                continue
            if model == EMA_SOURCE:
                if not self.ema_sources:
                    raise ValueError(f"node {t} is {EMA_SOURCE}, but this search space has no --ema-sources")
                nodes.append(Node(EMA, of=0))
                continue
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
        if self.ensemble_target and all(n.frozen for n in nodes[1:]):
            raise InvalidGraph("every member of the ensemble (node 0) has an all-cutoff gate row: nothing would train")
        # an EMA source learns nothing: its drawn row is cut
        gates = [[_CUTOFF] * len(names) if names[t] == EMA_SOURCE else list(row) for t, row in enumerate(gates)]
        features = None if feature_gates is None else canonical_feature_gates(names, gates, feature_gates)
        return Graph(nodes, [list(row) for row in gates], self.temperature, feature_gates=features,
                     feature_weight=self.feature_weight)

    def baselines(self) -> list[Baseline]:
        """The classic graphs of this node count, in the order the study runs them.

        independent (labels only; nodes 1…M−1 = the first candidate), DML (every gate
        through) with nodes 1…M−1 all one candidate, for each candidate, and KD (node 0 learns
        from the labels and frozen teachers, all one candidate) for each candidate that has a
        checkpoint in ``pretrained_dir``. KD uses the study's temperature, like every trial.

        With an ensemble target: independent and DML among nodes 1…M−1 (node 0's row and
        column cutoff) for each candidate, and no KD. With feature edges, ``dml+at`` too: DML
        with every feature edge between learning nodes through, for each candidate. The other
        baselines keep every feature edge cut: they are the classic graphs.
        Graphs that are canonically equal (one node: independent = DML) are listed once.
        """
        m = self.num_nodes
        cands = self.candidates or (self.target_model,)
        learns = set(self._learners())
        label_only = [[_THROUGH if s == t and t in learns else _CUTOFF for s in range(m)] for t in range(m)]
        dml = [[_THROUGH if t in learns and s in learns else _CUTOFF for s in range(m)] for t in range(m)]
        if self.ensemble_target:
            # Ensembles of one candidate trained apart are the classic baseline here, for each
            # candidate (unlike a trained node 0, which other independent nodes do not change).
            out = [Baseline("independent", self.params([c] * (m - 1), label_only)) for c in cands]
            out += [Baseline("dml", self.params([c] * (m - 1), dml)) for c in cands]
            # No KD: its student is node 0, which here is an ensemble and learns nothing; members
            # distilled from frozen teachers are one more searched graph, not a classic one.
        else:
            out = [Baseline("independent", self.params([cands[0]] * (m - 1), label_only))]
            out += [Baseline("dml", self.params([c] * (m - 1), dml)) for c in cands]
            if m > 1:
                for c in self.candidates:
                    if find_pretrained(self.pretrained_dir, self.dataset, c) is not None:
                        gates = [[_THROUGH] * m] + [[_CUTOFF] * m for _ in range(m - 1)]
                        out.append(Baseline("kd", self.params([c] * (m - 1), gates)))
        if self.feature_edges:
            at = [[_THROUGH if t in learns and s in learns and s != t else _CUTOFF for s in range(m)]
                  for t in range(m)]
            out += [Baseline("dml+at", self.params([c] * (m - 1), dml, at)) for c in cands]
        seen, unique = set(), []
        for b in out:
            key = self.canonical(b.params).key
            if key not in seen:
                seen.add(key)
                unique.append(b)
        return unique

    def settings(self) -> dict[str, Any]:
        """What must agree between the workers of one study (the checkpoint folder may not)."""
        out: dict[str, Any] = {"num_nodes": self.num_nodes, "target_model": self.target_model,
                               "candidates": list(self.candidates), "dataset": self.dataset,
                               "temperature": self.temperature}
        # only when on: the settings of a study made before the modes existed still match
        if self.ensemble_target:
            out["ensemble_target"] = True
        if self.feature_edges:
            out.update(feature_edges=True, feature_weight=self.feature_weight)
        if self.ema_sources:
            out["ema_sources"] = True
        return out
