"""The training recipe: every node's optimiser behind one step, timm's schedulers, the gate clock.

Each trainable node gets its own optimiser from timm's ``create_optimizer_v2`` (its own name,
lr and weight decay when the graph overrides them: a pretrained teacher and a scratch student
rarely share an lr). :class:`NodeOptimizers` puts them behind one ``step()``, so Accelerate's
one GradScaler unscales, checks and updates once per iteration: with one prepared optimiser
per node it would call ``scaler.update()`` once per node per step, changing the scale between
nodes and shrinking its growth interval M-fold. One timm scheduler drives the lr of all nodes,
since its per-group base values are the nodes' own learning rates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch

from .config import TrainConfig

__all__ = ["NodeOptimizers", "build_node_optimizer", "build_scheduler", "check_optimizer_names", "GateClock",
           "lr_at_epoch", "planned_lrs"]


class NodeOptimizers(torch.optim.Optimizer):
    """Several optimisers that step as one; ``param_groups`` are theirs, in node order.

    Not built through ``Optimizer.__init__`` on purpose: the parameter groups, state and
    hyper-parameters belong to the node optimisers, and are only forwarded from here.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], names: Sequence[str] = ()):  # noqa
        if not optimizers:
            raise ValueError("NodeOptimizers needs at least one optimiser")
        self.optimizers = list(optimizers)
        self.names = list(names) or [str(i) for i in range(len(self.optimizers))]
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self):  # type: ignore[override]
        merged = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    def groups_of(self, i: int) -> list[dict]:
        return self.optimizers[i].param_groups

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("NodeOptimizers.step takes no closure")
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [opt.state_dict() for opt in self.optimizers], "names": self.names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        states = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(f"optimiser state for {len(states) if isinstance(states, list) else '?'} nodes, "
                             f"expected {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)

    def __repr__(self) -> str:
        return "NodeOptimizers(" + ", ".join(f"{n}: {type(o).__name__}" for n, o in zip(self.names, self.optimizers)) + ")"


def _timm_opt_name(name: str, cfg: TrainConfig) -> str:
    name = name.strip().lower()
    # timm's "sgd" is Nesterov SGD: plain momentum when Nesterov is off, or there is no momentum.
    if name in ("sgd", "nesterov") and (not cfg.nesterov or cfg.momentum == 0):
        return "momentum"
    return name


def check_optimizer_names(graph, cfg: TrainConfig) -> None:
    from timm.optim import list_optimizers

    known = set(list_optimizers())
    for i, spec in enumerate(graph.nodes):
        name = _timm_opt_name(spec.opt or cfg.opt, cfg)
        if name not in known:
            import difflib
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            flag = f"--node-opt {i}:" if spec.opt else "--opt "
            raise ValueError(f"{flag}{spec.opt or cfg.opt}: timm has no optimiser of that name{hint}")


def build_node_optimizer(model: torch.nn.Module, spec, cfg: TrainConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    name = _timm_opt_name(spec.opt or cfg.opt, cfg)
    kwargs: dict[str, Any] = {}
    if name in ("sgd", "nesterov", "momentum"):
        kwargs["momentum"] = cfg.momentum
    return create_optimizer_v2(model, opt=name, lr=spec.lr if spec.lr is not None else cfg.lr,
                               weight_decay=spec.weight_decay if spec.weight_decay is not None else cfg.weight_decay,
                               filter_bias_and_bn=cfg.opt_filter_bias_bn, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, epochs: int, updates_per_epoch: int):
    """timm's scheduler for ``cfg`` over ``epochs``; its lr is set with ``step(epoch)`` at the
    start of every epoch (and ``step_update(k)`` after every update with ``--sched-on-updates``)."""
    from timm.scheduler import create_scheduler_v2

    per_update = cfg.sched_on_updates
    # timm's multistep decays once t + 1 passes a milestone; the project's milestones are the
    # 0-based epochs that first run at the decayed lr, so shift by one epoch (one update).
    shift = 1.0 / updates_per_epoch if per_update else 1.0
    milestones = cfg.decay_milestones_for(epochs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=epochs,
        decay_epochs=cfg.decay_epochs if cfg.decay_epochs is not None else max(1, round(0.3 * epochs)),
        decay_milestones=[m + shift for m in milestones], decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, cooldown_epochs=0,
        step_on_epochs=not per_update, updates_per_epoch=updates_per_epoch if per_update else 0)
    return scheduler


def planned_lrs(cfg: TrainConfig, *, epochs: Optional[int] = None, base_lrs: Sequence[float] = (),
                updates_per_epoch: int = 1) -> list[list[float]]:
    """The lr of every group at the start of every epoch, from timm's scheduler on dummy groups."""
    epochs = cfg.epochs if epochs is None else epochs
    base = list(base_lrs) or [cfg.lr]
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in base], lr=base[0])
    scheduler = build_scheduler(opt, cfg, epochs=epochs, updates_per_epoch=updates_per_epoch)
    out = []
    for e in range(epochs):
        scheduler.step(e)
        if cfg.sched_on_updates:
            scheduler.step_update(e * updates_per_epoch)
        out.append([g["lr"] for g in opt.param_groups])
    return out


def lr_at_epoch(cfg: TrainConfig, epoch: int) -> float:
    """The run-wide lr at the start of 0-based ``epoch`` (node overrides aside)."""
    return planned_lrs(cfg, epochs=max(cfg.epochs, epoch + 1))[epoch][0]


@dataclass
class GateClock:
    """``progress`` of the linear gates: k/K over the run (SPEC §2).

    A resume that changes the run's length re-plans it from where it stands, so the weight
    never jumps: it keeps rising linearly from its current value to 1 at the new end.
    """
    end_iteration: int
    start_iteration: int = 0
    start_progress: float = 0.0

    def progress(self, iteration: int) -> float:
        k0, p0, k1 = self.start_iteration, self.start_progress, self.end_iteration
        if k1 <= k0:
            return 1.0
        return min(1.0, p0 + (1.0 - p0) * (iteration - k0) / (k1 - k0))

    def replanned(self, at_iteration: int, end_iteration: int) -> "GateClock":
        return GateClock(end_iteration=end_iteration, start_iteration=at_iteration,
                         start_progress=self.progress(at_iteration))

    def to_dict(self) -> dict:
        return asdict(self)

