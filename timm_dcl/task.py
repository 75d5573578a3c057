"""A Knowledge Transfer Graph as a timm training task: the graph's one forward and loss.

:class:`KTGTask` is a :class:`timm.task.TrainingTask`: it holds the graph's networks and its
loss, and ``task(input, target)`` returns ``{"loss", "output", "losses", "logits"}``, so a
timm user trains a graph in their own loop (or in anything that drives timm's tasks) the way
they train with timm's ``LogitDistillationTask``. :class:`~timm_dcl.trainer.GraphTrainer`
runs on it too: this module is the only definition of the graph's forward and loss.

What it does per step (SPEC §2-§3): every node sees the batch normalised as it expects (the
input comes normalised for node 0, as timm's loader gives it, and is re-normalised for a node
whose pretrained_cfg mean/std differ, as timm's ``DistillationTeacher.normalize_input`` does;
uint8 pixels are normalised for each node from the pixels instead); frozen nodes run in eval
mode under no_grad; ensemble nodes average their members' detached logits; an ``ema:N`` node's
logits are node N's EMA (timm's ``ModelEmaV3``, eval mode, no grad) on node N's view of the
batch, the EMAs being the task's (:attr:`KTGTask.node_emas`, updated by :meth:`KTGTask.update_ema`
after each optimiser step); the fused op gives
every node its ``L_t`` (plus its feature edges'); ``loss`` is their sum, so one backward trains
every node by its own loss. Soft targets (float ``[B, C]``: mixup, label smoothing) go to the
op as they are; feature edges take their argmax. ``progress`` (k/K, the linear gates' weight) is a 0-d buffer the
caller sets: a compiled step reads it as an input and never recompiles as it moves.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from timm.task import TrainingTask

from .features import FeatureEdgeLoss, WithFeatures
from .gates import GATE_NAMES, Gate
from .graph import DEFAULT_FEATURE_WEIGHT, EMA, ENSEMBLE, Graph, Node
from .nodes import pretrained_stats
from .ops import KTGLoss

__all__ = ["KTGTask", "ensemble_logits", "NodeView"]

_CUTOFF = GATE_NAMES[Gate.CUTOFF]
# A Node stand-in for a module the caller built: it has weights, so an all-cutoff row makes it
# a frozen teacher (Graph's own rule); never a path that is read.
_MODULE_WEIGHTS = "<module>"
ENSEMBLE_MEANS = ("logits", "probs")


def ensemble_logits(members: list[torch.Tensor], mean: str = "logits") -> torch.Tensor:
    """An ensemble node's logits from its members' ``[B, C]`` logits: their mean (``logits``),
    or the log of the mean of their softmaxes (``probs``), which softmax maps back to that mean."""
    z = torch.stack(members)
    if mean == "logits":
        return z.mean(dim=0)
    if mean == "probs":
        return (torch.logsumexp(z.float().log_softmax(dim=-1), dim=0) - math.log(len(members))).to(z.dtype)
    raise ValueError(f"--ensemble-mean must be logits or probs, got {mean!r}")


def _ensemble_node(text: str) -> Optional[Node]:
    """``ensemble`` / ``ensemble:1+2`` (as --node-models takes them) as a Node, else None."""
    name, sep, rest = text.partition(":")
    if name.strip() != ENSEMBLE:
        return None
    if not sep:
        return Node(ENSEMBLE)
    try:
        return Node(ENSEMBLE, members=[int(v) for v in rest.split("+")])
    except ValueError:
        raise ValueError(f"models: {text!r}: expected ensemble:N+N+... with node indices, e.g. ensemble:1+2") from None


def _ema_node(text: str) -> Optional[Node]:
    """``ema:N`` (as --node-models takes it) as a Node, else None."""
    name, sep, rest = text.partition(":")
    if name.strip() != EMA:
        return None
    try:
        return Node(EMA, of=int(rest))
    except ValueError:
        raise ValueError(f"models: {text!r}: expected ema:N with the index of the node whose EMA it is") from None


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


class NodeView(nn.Module):
    """Node ``index``'s logits from the task's eval forward: the eval model of an ensemble node 0
    (its members may see differently normalised inputs, which only the task knows)."""

    def __init__(self, task: "KTGTask", index: int):
        super().__init__()
        self.task = task
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task.node_logits(x)[self.index]


class KTGTask(TrainingTask):
    """A Knowledge Transfer Graph as a timm training task.

    Args:
        models: one entry per node, node 0 (the target) first: an ``nn.Module``, a timm model
            name (built with node 0's class count; with timm's pretrained weights when the node
            is frozen), or ``"ensemble"`` / ``"ensemble:1+2"`` (a virtual node, the mean of its
            members' logits, as ``--node-models`` takes it), or ``"ema:N"`` (a virtual node, the
            logits of node N's EMA).
        gates: M×M gate names, ``gates[t][s]`` the edge from s into t (SPEC §1); or
        preset: ``dml`` (the default when neither is given), ``kd`` or ``independent``.
        temperature: T of the knowledge edges (default 1; the ``kd`` preset's 2, as ``train_dcl.py``).
        feature_gates, feature_stage, feature_weight: attention-transfer edges (``features.py``).
        ensemble_mean: how ensemble nodes combine their members (``logits`` or ``probs``).
        num_classes: the class count of nodes given by name (default: node 0's ``num_classes``).
        normalise: False feeds every node pixels in [0, 1] (``--recipe paper``); then a float
            input is taken as such pixels.
        channels_last: hand every node its input in NHWC.
        frozen_bn_train: frozen nodes' BatchNorm on batch statistics in ``train()`` (the
            authors' code); they still get no gradient.
        ema_nodes: the networks that keep an EMA (timm's ``ModelEmaV3``) besides those an
            ``ema:N`` node reads (``train_dcl.py --model-ema``: every trainable node).
        ema_decay, ema_warmup: the EMAs' decay and timm's warm-up (``--model-ema-decay``,
            ``--model-ema-warmup``).

    A node whose gate row is all cutoff (a module or a name; an ensemble excepted) is frozen:
    ``requires_grad_(False)``, kept in eval mode by :meth:`train`, run under no_grad and never
    wrapped by :meth:`prepare_distributed`.
    """

    def __init__(
            self,
            models: Sequence[Union[nn.Module, str]],
            gates: Optional[Sequence[Sequence[str]]] = None,
            *,
            preset: Optional[str] = None,
            temperature: Optional[float] = None,
            feature_gates: Optional[Sequence[Sequence[str]]] = None,
            feature_stage: int = -1,
            feature_weight: float = DEFAULT_FEATURE_WEIGHT,
            ensemble_mean: str = "logits",
            num_classes: Optional[int] = None,
            normalise: bool = True,
            channels_last: bool = False,
            frozen_bn_train: bool = False,
            ema_nodes: Sequence[int] = (),
            ema_decay: float = 0.9998,
            ema_warmup: bool = False,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if isinstance(models, (str, nn.Module)) or not isinstance(models, Sequence) or not models:
            raise TypeError("models: expected a non-empty list of nn.Modules, timm model names, 'ensemble' or "
                            "'ema:N' entries")
        if ensemble_mean not in ENSEMBLE_MEANS:
            raise ValueError(f"ensemble_mean must be one of {', '.join(ENSEMBLE_MEANS)}, got {ensemble_mean!r}")
        self.graph = graph = self._graph_of(models, gates, preset, temperature, feature_gates, feature_stage,
                                            feature_weight)
        m = graph.num_nodes
        self.ensemble_mean = ensemble_mean
        self.channels_last = bool(channels_last)
        self.frozen_bn_train = bool(frozen_bn_train)
        self.num_classes = self._class_count(models, graph, num_classes)
        self.frozen = tuple(bool(n.frozen) for n in graph.nodes)
        self.members = tuple(graph.ensemble_members(i) if n.is_ensemble else () for i, n in enumerate(graph.nodes))
        self.ema_of = tuple(graph.ema_source(i) if n.is_ema else None for i, n in enumerate(graph.nodes))
        nets: list[Optional[nn.Module]] = []
        for i, (entry, spec) in enumerate(zip(models, graph.nodes)):
            if spec.is_virtual:
                nets.append(None)
            elif isinstance(entry, nn.Module):
                nets.append(entry)
            else:
                import timm

                nets.append(timm.create_model(entry, pretrained=spec.frozen, num_classes=self.num_classes))
        for i, net in enumerate(nets):
            if net is not None and self.frozen[i]:
                net.eval().requires_grad_(False)
        self._nets = nets  # the raw networks by node (None: a virtual node); owned through the dicts below
        # Registered once each, by node index: state_dict keys trainable_module.<i>.*, frozen_module.<i>.*.
        self.trainable_module = nn.ModuleDict({str(i): n for i, n in enumerate(nets) if n is not None
                                               and not self.frozen[i]})
        self.frozen_module = nn.ModuleDict({str(i): n for i, n in enumerate(nets) if n is not None and self.frozen[i]})
        feature_nodes = set(graph.feature_nodes)
        # What the training step calls per node: the network, inside WithFeatures when it is in a
        # feature edge (DDP must see the call that makes the features), DDP-wrapped or compiled
        # later. A plain list: the wrappers own no state of their own.
        self._train_modules: list[Optional[nn.Module]] = [
            None if net is None else (WithFeatures(net, graph.feature_stage) if i in feature_nodes else net)
            for i, net in enumerate(nets)]
        self.loss_fn = KTGLoss(graph.gates, graph.temperature)
        self.feature_loss = (FeatureEdgeLoss(graph.feature_gate_codes, m, graph.feature_weight)
                             if graph.has_feature_edges else None)
        # Input normalisation: one (mean, std) per distinct key, the reference being node 0's
        # (its first member's when it is an ensemble, its network's when an EMA): what a timm
        # loader for node 0 gives.
        self.norm_keys = tuple(None if net is None else pretrained_stats(net, normalise=normalise) for net in nets)
        ref = 0 if nets[0] is not None else self.ema_of[0] if self.ema_of[0] is not None else self.members[0][0]
        self.input_key = self.norm_keys[ref]
        self._keys = list(dict.fromkeys(k for k in self.norm_keys if k is not None))
        for j, (mean, std) in enumerate(self._keys):
            mean_t = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
            std_t = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
            self.register_buffer(f"_mean{j}", mean_t, persistent=False)
            self.register_buffer(f"_std{j}", std_t, persistent=False)
            # uint8 pixels are normalised in one step, as (x - 255·mean) / (255·std)
            self.register_buffer(f"_mean255_{j}", mean_t * 255.0, persistent=False)
            self.register_buffer(f"_std255_{j}", std_t * 255.0, persistent=False)
        # k/K of the linear gates; a tensor, so that a compiled step takes a new value without
        # recompiling. float64: the op reads it at full precision.
        self.register_buffer("progress", torch.ones((), dtype=torch.float64, device=self.device), persistent=False)
        self._setup_node_emas(ema_nodes, ema_decay, ema_warmup)

    def _setup_node_emas(self, extra: Sequence[int], decay: float, warmup: bool) -> None:
        """One ModelEmaV3 per network that keeps an EMA (ema.py's NodeEmas), of the unwrapped
        network, so DDP and compile wrappers are not copied into it. Registered as ``node_ema``
        too, so that ``to()`` moves the EMAs with the task and its state_dict holds them."""
        from .ema import NodeEmas

        wanted = {int(i) for i in extra} | {s for s in self.ema_of if s is not None}
        for i in sorted(wanted):
            if not (0 <= i < len(self._nets)) or not self.trains(i):
                raise ValueError(f"ema_nodes: node {i} is not a network that trains, so it keeps no EMA")
        self.node_emas = NodeEmas({i: self._nets[i] for i in sorted(wanted)}, decay=decay, warmup=warmup)
        self.node_ema = nn.ModuleDict({str(i): ema for i, ema in self.node_emas.emas.items()})

    # ------------------------------------------------------------------------ construction
    @staticmethod
    def _graph_of(models, gates, preset, temperature, feature_gates, feature_stage, feature_weight) -> Graph:
        """The graph the arguments describe, validated by :class:`Graph` (its errors, its rules)."""
        def node(i: int, entry, frozen_name: bool) -> Node:
            if isinstance(entry, nn.Module):
                return Node(_model_name(entry), checkpoint=_MODULE_WEIGHTS)
            if not isinstance(entry, str) or not entry.strip():
                raise TypeError(f"models[{i}]: expected an nn.Module, a timm model name or 'ensemble', got {entry!r}")
            virtual = _ensemble_node(entry) or _ema_node(entry)
            return virtual if virtual is not None else Node(entry.strip(), pretrained=frozen_name)

        if gates is not None and preset is not None:
            raise ValueError("give either gates or a preset, not both")
        if gates is None:
            # A name in a frozen slot of the preset (kd's teacher) gets timm's pretrained weights.
            probe = Graph.preset(preset or "dml", [f"m{i}" for i in range(len(models))],
                                 nodes=[node(i, e, True) for i, e in enumerate(models)])
            rows = probe.gates
        else:
            rows = [list(r) for r in gates] if not isinstance(gates, torch.Tensor) else gates
            probe = None
        from .gates import decode_gates, encode_gates

        names = decode_gates(encode_gates(rows, len(models)))
        nodes = [node(i, e, i > 0 and all(g == _CUTOFF for g in names[i])) for i, e in enumerate(models)]
        if temperature is None:
            temperature = probe.temperature if probe is not None else 1.0
        return Graph(nodes, names, temperature,
                     feature_gates=[list(r) for r in feature_gates] if feature_gates is not None else None,
                     feature_stage=feature_stage, feature_weight=feature_weight)

    @staticmethod
    def _class_count(models, graph: Graph, num_classes: Optional[int]) -> int:
        if num_classes is not None:
            return int(num_classes)
        first = [i for i, n in enumerate(graph.nodes) if not n.is_virtual]
        node0 = graph.nodes[0]
        ref = list(graph.ensemble_members(0)) if node0.is_ensemble else [node0.of] if node0.is_ema else [0]
        for i in ref + first:
            if isinstance(models[i], nn.Module) and isinstance(getattr(models[i], "num_classes", None), int):
                return models[i].num_classes
        raise ValueError("num_classes: node 0 is no module with a num_classes to take it from; pass num_classes=")

    @classmethod
    def from_graph(cls, graph: Union[Graph, str, Mapping], models: Optional[Sequence[Optional[nn.Module]]] = None, *,
                   num_classes: Optional[int] = None, input_size: Optional[tuple[int, int, int]] = None,
                   **kwargs) -> "KTGTask":
        """The task of a :class:`Graph`, a graph JSON file or its dict (``best_graph.json`` of a search).

        ``models`` gives the networks (None for virtual nodes: ensembles, EMAs); without it every node is built
        as ``train_dcl.py`` builds it (its checkpoint, pretrained weights or file, its kwargs),
        for ``num_classes`` classes at ``input_size`` (default: node 0's pretrained_cfg)."""
        if isinstance(graph, Mapping):
            graph = Graph.from_dict(graph)
        elif not isinstance(graph, Graph):
            graph = Graph.load(graph)
        if models is None:
            from .nodes import create_node_model

            if num_classes is None:
                raise ValueError("from_graph: pass num_classes= to build the graph's models")
            if input_size is None:
                import timm
                pc = timm.models.get_pretrained_cfg(graph.reference_model)
                input_size = tuple(getattr(pc, "input_size", None) or (3, 224, 224))
            models = [None if spec.is_virtual else
                      create_node_model(spec, i, num_classes=num_classes, input_size=input_size,
                                        log=(print if kwargs.get("verbose", True) else (lambda *_: None)))
                      for i, spec in enumerate(graph.nodes)]
        if len(models) != graph.num_nodes:
            raise ValueError(f"models: {len(models)} entries for a graph of {graph.num_nodes} nodes")
        entries = []
        for i, (spec, model) in enumerate(zip(graph.nodes, models)):
            if spec.is_ensemble:
                entries.append(ENSEMBLE + (":" + "+".join(map(str, spec.members)) if spec.members is not None else ""))
            elif spec.is_ema:
                entries.append(f"{EMA}:{spec.of}")
            elif isinstance(model, nn.Module):
                entries.append(model)
            else:
                raise TypeError(f"models[{i}]: node {i} ({spec.model}) needs an nn.Module, got {type(model).__name__}")
        task = cls(entries, graph.gates, temperature=graph.temperature, feature_gates=graph.feature_gates,
                   feature_stage=graph.feature_stage, feature_weight=graph.feature_weight,
                   num_classes=num_classes, **kwargs)
        task.graph = graph  # the caller's nodes (model names, checkpoints), not the stand-ins
        return task

    # ------------------------------------------------------------------------ nodes
    @property
    def num_nodes(self) -> int:
        return len(self._nets)

    def node_module(self, index: int) -> Optional[nn.Module]:
        """Node ``index``'s network, unwrapped (None for a virtual node: an ensemble, an EMA)."""
        return self._nets[index]

    def train_module(self, index: int) -> Optional[nn.Module]:
        """What the training step calls for node ``index`` (wrapped: features, DDP, compile)."""
        return self._train_modules[index]

    def set_train_module(self, index: int, module: nn.Module) -> None:
        """Replace node ``index``'s training callable by a wrapper of it (Accelerate's prepare)."""
        if self._nets[index] is None:
            raise ValueError(f"node {index} is virtual (an ensemble or an EMA): it has no module")
        self._train_modules[index] = module

    def trains(self, index: int) -> bool:
        return self._nets[index] is not None and not self.frozen[index]

    @property
    def trainable_nodes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_nodes) if self.trains(i))

    def trainable_parameters(self):
        """Every trainable node's parameters (frozen and virtual nodes have none)."""
        for i in self.trainable_nodes:
            yield from self._nets[i].parameters()

    def param_groups(self, weight_decay: float = 0.0, *, filter_bias_and_bn: bool = True,
                     node_lr: Optional[Mapping[int, float]] = None,
                     node_weight_decay: Optional[Mapping[int, float]] = None) -> list[dict]:
        """Parameter groups for one optimiser over every trainable node (timm's
        ``create_optimizer_v2`` takes them): per node, its decayed and its no-decay parameters
        (biases, norms, the model's ``no_weight_decay()``) as timm groups them, each group
        tagged ``node`` and carrying the node's own ``lr`` / ``weight_decay`` when given."""
        from timm.optim import param_groups_weight_decay

        groups = []
        for i in self.trainable_nodes:
            net = self._nets[i]
            wd = (node_weight_decay or {}).get(i, weight_decay)
            if filter_bias_and_bn and wd:
                skip = net.no_weight_decay() if hasattr(net, "no_weight_decay") else ()
                node_groups = param_groups_weight_decay(net, wd, skip)
            else:
                node_groups = [{"params": [p for p in net.parameters() if p.requires_grad], "weight_decay": wd}]
            for g in node_groups:
                g["node"] = i
                if node_lr and i in node_lr:
                    g["lr"] = float(node_lr[i])
                if g["params"]:
                    groups.append(g)
        return groups

    def set_progress(self, k: Union[float, int, torch.Tensor], total: Optional[int] = None) -> None:
        """The linear gates' weight: ``k / total`` (``total`` given) or ``k`` itself, a value in [0, 1]."""
        value = float(k) / float(total) if total is not None else float(k)
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"progress must be k/K in [0, 1], got {value!r}")
        self.progress.fill_(value)

    def train(self, mode: bool = True) -> "KTGTask":
        """Train mode for the trainable nodes (and their wrappers); frozen nodes stay in eval mode
        (train mode too under ``frozen_bn_train``)."""
        super().train(mode)
        for i, net in enumerate(self._nets):
            if net is None:
                continue
            frozen_mode = mode and self.frozen_bn_train
            if self.frozen[i]:
                net.train(frozen_mode)
            else:
                self._train_modules[i].train(mode)
        for ema in self.node_emas.emas.values():  # evaluated as timm evaluates its EMAs, always
            ema.eval()
        return self

    def update_ema(self, step: Optional[int] = None) -> None:
        """After an optimiser step: timm's task EMA (``setup_ema``) and every node's EMA (``node_emas``),
        ``step`` the update count (timm's warm-up reads it)."""
        super().update_ema(step)
        self.node_emas.update({i: self._nets[i] for i in self.node_emas.indices}, step=step)

    # ------------------------------------------------------------------------ distributed, compile
    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "KTGTask":
        """Wrap each trainable node in its own DistributedDataParallel (frozen nodes have no
        gradients to synchronise; the nodes are separate networks with their own losses)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        for i in self.trainable_nodes:
            if not isinstance(self._train_modules[i], DDP):
                self._train_modules[i] = DDP(self._train_modules[i], device_ids=device_ids, **ddp_kwargs)
        return self

    def no_sync(self):
        """Every DDP-wrapped node's ``no_sync`` at once (gradient accumulation)."""
        stack = contextlib.ExitStack()
        for i in self.trainable_nodes:
            if hasattr(self._train_modules[i], "no_sync"):
                stack.enter_context(self._train_modules[i].no_sync())
        return stack

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the whole step (normalisation, every node, the loss op) as one graph, as
        ``train_dcl.py --compile`` does, and the eval model; returns the compiled eval model."""
        self._compiled_step = torch.compile(self.forward_step, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = torch.compile(self.get_eval_model(), backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    # ------------------------------------------------------------------------ timm's task state
    def get_trainable_module(self, ema: bool = False) -> Optional[nn.Module]:
        if ema:
            return getattr(self, "trainable_module_ema", None)
        return self.trainable_module

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """Node 0's network (its logits are the task's ``output``); for an ensemble node 0, a
        :class:`NodeView` that computes the ensemble from its members."""
        if module is not None:
            return module
        if ema:
            return getattr(self, "eval_model_ema", None)
        if hasattr(self, "eval_model"):
            return self.eval_model
        return self._nets[0] if self._nets[0] is not None else NodeView(self, 0)

    def get_clip_parameters(self, exclude_head: bool = False):
        if exclude_head:
            return [p for i in self.trainable_nodes for p in list(self._nets[i].parameters())[:-2]]
        return list(self.trainable_parameters())

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> dict[str, Any]:
        """What the eval model's state_dict leaves out: the other nodes' state (trainable nodes,
        and frozen ones whose BatchNorm statistics move under ``frozen_bn_train``) and the progress."""
        if ema:
            return {}
        if self._nets[0] is None:  # the eval model is a NodeView: its state_dict is the whole task's
            return {"progress": float(self.progress)}
        nodes = {i: net.state_dict() for i, net in enumerate(self._nets)
                 if net is not None and i != 0 and (not self.frozen[i] or self.frozen_bn_train)}
        return {"nodes": nodes, "progress": float(self.progress)}

    def load_task_state(self, state: Optional[dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if not state or ema:
            return
        for i, node_state in (state.get("nodes") or {}).items():
            i = int(i)
            if not 0 <= i < self.num_nodes or self._nets[i] is None:
                if strict:
                    raise RuntimeError(f"task state holds node {i}, which this graph has no network for")
                continue
            self._nets[i].load_state_dict(node_state, strict=strict)
        if "progress" in state:
            self.set_progress(state["progress"])

    # ------------------------------------------------------------------------ the forward
    def pixel_stats(self, index: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean·255, std·255), each ``[1, C, 1, 1]``, of node ``index``'s input normalisation (default:
        the first network's, in node order): pixel-space statistics, as batch mixing needs them."""
        if index is None:
            index = next(i for i, net in enumerate(self._nets) if net is not None)
        key = self.norm_keys[index]
        if key is None:
            raise ValueError(f"node {index} is virtual (an ensemble or an EMA): it has no input normalisation")
        j = self._keys.index(key)
        return getattr(self, f"_mean255_{j}"), getattr(self, f"_std255_{j}")

    def node_inputs(self, input: torch.Tensor, *, pixels: Optional[bool] = None) -> dict:
        """The batch as each distinct (mean, std) sees it: from pixels, each normalised once from
        the pixels; from a float input normalised as node 0 expects, re-normalised.

        ``pixels``: whether ``input`` holds pixel values (0…255), uint8 or float; by default only
        uint8 does. Mixed, erased batches are float pixels (:mod:`timm_dcl.mixing`).
        """
        out = {}
        ref = self._keys.index(self.input_key)
        if pixels is None:
            pixels = input.dtype == torch.uint8
        if pixels:
            x = input.float()
            for j, key in enumerate(self._keys):
                out[key] = (x - getattr(self, f"_mean255_{j}")) / getattr(self, f"_std255_{j}")
        else:
            mean0, std0 = getattr(self, f"_mean{ref}"), getattr(self, f"_std{ref}")
            for j, key in enumerate(self._keys):
                # as timm's DistillationTeacher.normalize_input: back to pixels, then the node's own
                out[key] = input if j == ref else ((input * std0 + mean0 - getattr(self, f"_mean{j}"))
                                                  / getattr(self, f"_std{j}"))
        if self.channels_last:
            out = {k: v.contiguous(memory_format=torch.channels_last) for k, v in out.items()}
        return out

    def run_nodes(self, inputs: dict, *, train: bool) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """Every node's logits, in node order, and (training only) the features of the nodes in
        feature edges (None for the others). ``train=False``: every network unwrapped, no grad.
        An ensemble's logits come from its members' (detached), so the loss op sees it as one
        more source and needs no kernel of its own; an EMA node's from its network's EMA, on the
        input its network sees (eval mode, no grad: its BatchNorm uses the averaged statistics)."""
        logits: list = []
        features: list = [None] * self.num_nodes
        for i, net in enumerate(self._nets):
            if net is None:
                src = self.ema_of[i]
                logits.append(None if src is None else self.node_emas.logits(src, inputs[self.norm_keys[src]]))
                continue
            x = inputs[self.norm_keys[i]]
            if self.frozen[i] or not train:
                with torch.no_grad():
                    out = (net if not train else self._train_modules[i])(x)
            else:
                out = self._train_modules[i](x)
            if isinstance(out, tuple):  # WithFeatures: (logits, features)
                out, features[i] = out
            logits.append(out)
        if len({z.dtype for z in logits if z is not None}) > 1:  # e.g. a head kept in float32 under autocast
            logits = [z if z is None else z.float() for z in logits]
        for i, members in enumerate(self.members):
            if members:
                logits[i] = ensemble_logits([logits[s].detach() for s in members], self.ensemble_mean)
        return logits, features

    @torch.no_grad()
    def node_logits(self, input: torch.Tensor) -> list[torch.Tensor]:
        """Every node's evaluation logits (networks as they are, no grad) for ``input``."""
        return self.run_nodes(self.node_inputs(input), train=False)[0]

    def forward_step(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        return self.forward_inputs(self.node_inputs(input), target)

    def forward_inputs(self, inputs: dict, target: torch.Tensor) -> dict[str, Any]:
        """:meth:`forward` from the batch as each (mean, std) sees it (:meth:`node_inputs`' dict),
        for a caller that normalises the batch itself."""
        logits, features = self.run_nodes(inputs, train=True)
        losses = self.loss_fn(logits, target, progress=self.progress)
        out = {}
        if self.feature_loss is not None:
            # soft targets [B, C] (mixup, smoothing): an attention edge's label gate needs a class
            classes = target.argmax(dim=1) if target.dim() == 2 else target
            feature_losses = self.feature_loss(features, logits, classes, self.progress)
            losses = losses + feature_losses.to(losses.dtype)
            out["feature_losses"] = feature_losses
        # Frozen and virtual nodes' losses are 0 (all-cutoff rows): the sum is the trainable nodes'.
        return {"loss": losses.sum(), "output": logits[0], "losses": losses, "logits": logits, **out}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        """One training forward of the graph.

        Args:
            input: [B, C, H, W] normalised as node 0 expects (timm's loader), or uint8 pixels.
            target: class indices [B], or soft targets [B, C] (target probabilities: mixup, smoothing).

        Returns ``loss`` (Σ of the trainable nodes' L_t: one backward trains each node by its
        own loss), ``output`` (node 0's logits; the ensemble's when node 0 is one), ``losses``
        ([M], feature edges included), ``logits`` (M tensors) and, with feature edges,
        ``feature_losses`` ([M], their share).
        """
        step = getattr(self, "_compiled_step", None)
        return (step or self.forward_step)(input, target)
