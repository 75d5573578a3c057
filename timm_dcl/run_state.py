"""A training run's state on disk: checkpoints, the resume, the per-node weight files.

:class:`RunState` is the part of :class:`~timm_dcl.trainer.GraphTrainer` that reads and writes
``checkpoints/{last,best}.pth`` (a single file: every node's weights, the optimisers, the
GradScaler, every rank's RNG state, the lr and gate plan, the history), so that a run that
dies loses nothing a ``--resume`` cannot restore, and re-plans the schedule when the resume
asks for another ``--epochs``.

Every checkpoint write keeps the previous good one (``last.prev.pth``, ``best.prev.pth``) and
a SHA-256 beside each (:mod:`.safe_io`): a resume whose ``last.pth`` is damaged says so in one
line and continues from ``last.prev.pth``, an epoch earlier (a resume is bit-identical, so
nothing finished is lost).
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import node_weights_name, rng_state, save_node_weights, set_rng_state
from .graph import Graph
from .recipe import GateClock, build_scheduler
from .safe_io import DamagedFileError, load_torch, previous_path, save_torch, warn

__all__ = ["RunState", "STATE_FORMAT", "load_run_checkpoint", "NoUsableCheckpointError"]

STATE_FORMAT = "timm_dcl.train.v1"


def load_run_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (``last.pth``, ``best.pth`` or their ``.prev``), verified: a damaged
    file, or one that is not a timm-dcl training state, is :class:`~timm_dcl.safe_io.DamagedFileError`."""
    # Our own file: it holds RNG states (numpy arrays), so the full unpickler is needed.
    state = load_torch(path, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DamagedFileError(path, "not a timm-dcl training checkpoint")
    return state


class NoUsableCheckpointError(ValueError):
    """``--resume`` of a run whose ``last.pth`` and ``last.prev.pth`` are both damaged or missing."""


def _usable_checkpoint(run: Path) -> dict:
    """``last.pth``, else (damaged or missing) ``last.prev.pth`` with one warning line; neither:
    one error naming both."""
    last = run / "checkpoints" / "last.pth"
    prev = previous_path(last)
    if not last.is_file() and not prev.is_file():
        raise FileNotFoundError(f"--resume {run}: no checkpoint at {last}")
    problems = []
    for path in (last, prev):
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            state = load_run_checkpoint(path)
        except DamagedFileError as e:
            problems.append(str(e))
            continue
        if path == prev:
            warn(f"{problems[0]}; resuming from {prev.name} at epoch {state['epoch']}")
        return state
    raise NoUsableCheckpointError(f"--resume {run}: no usable checkpoint: {'; '.join(problems)}; start the run "
                                  "again with --output (or restore a copy of the run folder)")


class RunState:
    """Checkpoint and resume methods of GraphTrainer (a mixin: they use the trainer's nodes,
    optimisers, clock, scheduler and history)."""

    def _rng_states(self):
        """Every rank's RNG state, gathered (a resume restores each rank its own)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return [rng_state()]
        from accelerate.utils import gather_object
        return gather_object([rng_state()])

    def _state(self, rng) -> dict:
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "graph": self.graph.to_dict(),
            "num_classes": self.num_classes,
            "plan": {"epochs": self.planned_epochs, "iterations_per_epoch": len(self.train_loader),
                     "clock": self.clock.to_dict()},
            # A frozen node's state only changes with --frozen-bn train (its BN statistics drift).
            # An ensemble node has no state at all.
            "models": [None if n.is_ensemble or (n.frozen and not self._frozen_bn_train) else n.raw.state_dict()
                       for n in self.nodes],
            "optimizer": self.node_optimizers.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "rng": rng,
            "best": {"top1": self.best_top1, "epoch": self.best_epoch},
            "history": self.history,
        }

    def _save_state(self, which: str, rng: list, position: dict | None = None) -> None:
        if self.output is not None and self.accelerator.is_main_process:
            state = self._state(rng)
            if position is not None:  # a checkpoint in the middle of an epoch (preemption.py)
                state["position"] = position
            if self.emas:  # the EMAs of the nodes (ema.py)
                state["ema"] = self.emas.state_dict()
            save_torch(state, self.output / "checkpoints" / f"{which}.pth", keep_previous=True)

    def _read_resume_state(self) -> dict:
        state = _usable_checkpoint(Path(self.cfg.resume))
        path = Path(self.cfg.resume) / "checkpoints" / "last.pth"
        theirs, ours = Graph.from_dict(state["graph"]).to_dict(), self.graph.to_dict()
        if theirs != ours:
            diff = [k for k in ours if ours.get(k) != theirs.get(k)]
            raise ValueError(f"--resume {self.cfg.resume} holds a different graph (differs in: {', '.join(diff)}); "
                             "resume with the same graph, or omit --node-models/--graph to reuse its graph.json")
        if "optimizer" not in state or "plan" not in state:
            raise ValueError(f"--resume {self.cfg.resume}: {path} was written by an older timm-dcl "
                             "(one optimiser per node, no schedule plan); it cannot be resumed by this version")
        return state

    def _load_state(self, state: dict) -> None:
        acc, cfg = self.accelerator, self.cfg
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"--resume: the checkpoint has {state['num_classes']} classes, "
                             f"this data set {self.num_classes}")
        plan = state["plan"]
        if plan["iterations_per_epoch"] != len(self.train_loader):
            raise ValueError(f"--resume: the run had {plan['iterations_per_epoch']} iterations per epoch, this one "
                             f"{len(self.train_loader)}: resume with the same data, batch size and processes")
        for n, model_state in zip(self.nodes, state["models"]):
            if model_state is not None and (n.trains or (n.frozen and self._frozen_bn_train)):
                n.raw.load_state_dict(model_state)
        self.node_optimizers.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.best_top1, self.best_epoch = state["best"]["top1"], state["best"]["epoch"]
        self.history = list(state["history"])
        self._epoch_position = state.get("position")
        self._load_emas(state.get("ema"))
        self.clock = GateClock(**plan["clock"])
        self.planned_epochs = plan["epochs"]
        if plan["epochs"] != cfg.epochs:
            self._replan(plan["epochs"])
        rng = state["rng"]
        if isinstance(rng, list) and len(rng) == acc.num_processes:
            set_rng_state(rng[acc.process_index])
        else:
            from accelerate.utils import set_seed
            set_seed(cfg.seed + 7919 * self.epoch, device_specific=True)
            acc.print(f"resume: the run's RNG states are for {len(rng) if isinstance(rng, list) else 1} process(es), "
                      f"this run has {acc.num_processes}: dropout and augmentation are re-seeded")

    def _replan(self, old_epochs: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        per_epoch = self.accum.updates_per_epoch  # optimiser updates (--grad-accum-steps)
        if cfg.resume_schedule == "keep":
            self.scheduler = build_scheduler(self.node_optimizers, cfg, epochs=old_epochs, updates_per_epoch=per_epoch)
            acc.print(f"resume: --epochs {old_epochs} → {cfg.epochs}: keeping the original {old_epochs}-epoch "
                      "schedule (lr and linear gates); --resume-schedule replan re-plans them")
            return
        before = self.clock.progress(self.iteration)
        self.clock = self.clock.replanned(self.iteration, self._gate_iterations(cfg.epochs))
        self.planned_epochs = cfg.epochs
        self.scheduler = build_scheduler(self.node_optimizers, cfg, epochs=cfg.epochs, updates_per_epoch=per_epoch)
        acc.print(f"resume: --epochs {old_epochs} → {cfg.epochs}: lr schedule re-planned over {cfg.epochs} epochs; "
                  f"linear gates continue from {before:.3f} to 1 at the new end (--resume-schedule keep keeps "
                  "the original plan)")

    def _save_node_weights(self) -> None:
        for n, top1 in zip(self.nodes, self.history[-1]["top1"] if self.history else [None] * len(self.nodes)):
            if not n.trains:
                continue
            save_node_weights(self.output / "nodes" / node_weights_name(n.index, n.spec.model), n.raw,
                              model_name=n.spec.model, model_kwargs=n.spec.model_kwargs,
                              num_classes=self.num_classes, dataset=self.cfg.dataset, top1=top1,
                              ema=self.emas.module(n.index) if n.index in self.emas else None)
            self._save_node_folder(n, top1)

    def _save_node_folder(self, n, top1) -> None:
        """The node also as a folder timm loads (hub.py): its input as the run fed it."""
        from .hub import node_folder_name, save_node_folder
        from .nodes import resolve_eval_crop

        crop_pct, interpolation = resolve_eval_crop(self.cfg, self.graph.reference_model)
        mean, std = n.norm_key
        data_config = {"input_size": tuple(self.input_size), "mean": tuple(mean), "std": tuple(std),
                       "interpolation": interpolation, **({"crop_pct": crop_pct} if crop_pct is not None else {})}
        info = {"node": n.index, "graph": self.graph.to_dict(), "dataset": self.cfg.dataset, "top1": top1,
                "split": self.cfg.eval_split, "epochs": self.epoch}
        save_node_folder(self.output / "timm" / node_folder_name(n.index, n.spec.model), n.raw,
                         data_config=data_config, info=info)
