"""Trains a Knowledge Transfer Graph with Accelerate: every node at once, one loss op.

Data flows one way: config → graph → trainer → ``KTGLoss``. Each trainable node has its
own SGD optimiser; one backward pass of ``Σ_t L_t`` gives every node exactly its own
gradient, because the loss detaches every edge's source (SPEC §2).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import atomic_save, load_node_weights, node_weights_name, rng_state, save_node_weights, set_rng_state
from .config import TrainConfig
from .gates import Gate
from .graph import Graph
from .ops import KTGLoss

__all__ = ["train_graph", "GraphTrainer", "TrainResult", "lr_at_epoch"]

STATE_FORMAT = "timm_dcl.train.v1"
EpochCallback = Callable[[dict], None]


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_top1: float = float("nan")  # node 0, on the evaluation split
    best_epoch: int = 0
    output: Optional[Path] = None

    @property
    def final_top1(self) -> float:
        return self.history[-1]["top1"][0] if self.history else float("nan")


def lr_at_epoch(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: a closed form, so a resume to more epochs needs no state."""
    if cfg.sched == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr * cfg.decay_rate ** sum(1 for m in cfg.milestones if m <= epoch)


def _pretrained_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


class _Node:
    """One node at run time: its module, how it sees the input, and its optimiser."""

    def __init__(self, index: int, spec, model: nn.Module, frozen: bool):
        self.index = index
        self.spec = spec
        self.raw = model          # unwrapped: state_dict, evaluation
        self.train_model = model  # DDP-wrapped and/or compiled for training
        self.frozen = frozen
        self.optimizer = None
        self.norm_key = _pretrained_stats(model)

    @property
    def label(self) -> str:
        return f"{self.index}: {self.spec.model}" + (" (frozen)" if self.frozen else "")


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}


class GraphTrainer:
    def __init__(self, graph: Graph, cfg: TrainConfig, *, data=None, accelerator=None):
        self.graph = graph
        self.cfg = cfg
        self.output = Path(cfg.output) if cfg.output else (Path(cfg.resume) if cfg.resume else None)
        resume_state = self._read_resume_state() if cfg.resume else None
        graph.check_models()
        self._check_rows()

        if accelerator is None:
            from accelerate import Accelerator
            accelerator = Accelerator(mixed_precision=cfg.mixed_precision, **self._tracker_kwargs())
        self.accelerator = acc = accelerator
        if acc.device.type == "cuda":
            # CIFAR shapes never change within a run: let cuDNN pick its fastest algorithms.
            torch.backends.cudnn.benchmark = True
        from accelerate.utils import set_seed
        set_seed(cfg.seed)

        if data is None:
            from .data import build_data
            with acc.main_process_first():
                data = build_data(cfg.dataset, data_dir=cfg.data_dir, train_subset=cfg.train_subset,
                                  eval_subset=cfg.eval_subset, val_size=cfg.val_size, seed=cfg.seed,
                                  num_workers=cfg.workers)
        self.data = data
        self.channels_last = (cfg.channels_last if cfg.channels_last is not None
                              else acc.device.type == "cpu" or acc.mixed_precision in ("fp16", "bf16"))
        self.num_classes = data.num_classes
        self.eval_data = data.val if cfg.eval_split == "val" else data.eval
        if self.eval_data is None:
            raise ValueError("evaluation on the validation split needs --val-size ≥ 1")

        self.nodes = [self._build_node(i, spec) for i, spec in enumerate(graph.nodes)]
        self.loss_fn = KTGLoss(graph.gates, graph.temperature)
        self._prepare()

        from .data import BatchLoader
        # On a GPU the decoded uint8 split lives on the device: batches are sliced there.
        on_gpu = acc.device.type != "cpu"
        self.train_loader = BatchLoader(data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=False,
                                        seed=cfg.seed, num_shards=acc.num_processes,
                                        shard_index=acc.process_index, device=acc.device if on_gpu else None)
        self._eval_tensors = (self.eval_data.images.to(acc.device), self.eval_data.labels.to(acc.device))
        if len(self.train_loader) == 0:
            raise ValueError(f"the training split ({len(data.train)} images) gives no batch of "
                             f"{cfg.batch_size} on each of {acc.num_processes} processes")
        self.total_iterations = cfg.epochs * len(self.train_loader)
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict] = []
        self.best_top1, self.best_epoch = float("-inf"), 0
        if resume_state is not None:
            self._load_state(resume_state)

    # ----------------------------------------------------------------------------- setup
    def _tracker_kwargs(self) -> dict:
        if self.output is None:
            return {}
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return {}
        return {"log_with": "tensorboard", "project_dir": str(self.output)}

    def _check_rows(self) -> None:
        m = self.graph.num_nodes
        codes = self.graph.gate_codes
        for t, spec in enumerate(self.graph.nodes):
            row_cut = all(codes[t * m + s] == Gate.CUTOFF for s in range(m))
            if row_cut and not spec.frozen:
                raise ValueError(
                    f"node {t} ({spec.model}) has an all-cutoff gate row, so it would learn nothing: "
                    "give it a checkpoint (a frozen pre-trained node) or open one of its gates")

    def _build_node(self, index: int, spec) -> _Node:
        import timm

        where = f"node {index} ({spec.model})"
        try:
            model = timm.create_model(spec.model, pretrained=False, num_classes=self.num_classes,
                                      **spec.model_kwargs)
        except TypeError as e:
            raise ValueError(f"{where}: bad model keyword arguments {spec.model_kwargs}: {e}") from None
        if spec.frozen:
            load_node_weights(spec.checkpoint, model, model_name=spec.model, num_classes=self.num_classes,
                              where=where)
            model.eval().requires_grad_(False)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return _Node(index, spec, model, spec.frozen)

    def _prepare(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        trainable = [n for n in self.nodes if not n.frozen]
        for n in trainable:
            n.optimizer = torch.optim.SGD(n.raw.parameters(), lr=lr_at_epoch(cfg, 0), momentum=cfg.momentum,
                                          nesterov=cfg.nesterov and cfg.momentum > 0,
                                          weight_decay=cfg.weight_decay)
        # Frozen teachers are never wrapped in DDP: they have no gradients to synchronise.
        prepared = acc.prepare(*[n.raw for n in trainable], *[n.optimizer for n in trainable])
        if not isinstance(prepared, tuple):
            prepared = (prepared,)
        k = len(trainable)
        for n, model, opt in zip(trainable, prepared[:k], prepared[k:]):
            n.train_model, n.optimizer = model, opt
            n.raw = acc.unwrap_model(model)
        for n in self.nodes:
            if n.frozen:
                n.raw.to(acc.device)
                n.train_model = n.raw
            if cfg.compile:
                n.train_model = torch.compile(n.train_model)
        device = acc.device
        self._norms = {}
        for key in {n.norm_key for n in self.nodes}:
            mean, std = key
            self._norms[key] = (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
                                torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)

    # ------------------------------------------------------------------------- one step
    def _inputs(self, images_uint8: torch.Tensor) -> dict:
        """The batch as each distinct (mean, std) sees it, normalised once per group."""
        x = images_uint8.float()
        out = {}
        for key, (mean, std) in self._norms.items():
            xn = (x - mean) / std
            if self.channels_last:
                xn = xn.contiguous(memory_format=torch.channels_last)
            out[key] = xn
        return out

    def _forward(self, inputs: dict, *, train: bool) -> list[torch.Tensor]:
        logits = []
        for n in self.nodes:
            x = inputs[n.norm_key]
            if n.frozen or not train:
                with torch.no_grad():
                    logits.append((n.raw if not train else n.train_model)(x))
            else:
                logits.append(n.train_model(x))
        if len({z.dtype for z in logits}) > 1:  # e.g. a head kept in float32 under autocast
            logits = [z.float() for z in logits]
        return logits

    def _train_epoch(self, epoch: int) -> list[float]:
        from tqdm.auto import tqdm

        from .data import augment_batch

        acc, cfg = self.accelerator, self.cfg
        lr = lr_at_epoch(cfg, epoch)
        for n in self.nodes:
            if not n.frozen:
                n.train_model.train()
                for group in n.optimizer.param_groups:
                    group["lr"] = lr
        self.train_loader.set_epoch(epoch)
        # Augmentation randomness depends only on (seed, epoch, rank): a resume replays it exactly.
        gen = torch.Generator(device=acc.device)
        gen.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + acc.process_index)
        loss_sum = torch.zeros(len(self.nodes), dtype=torch.float64, device=acc.device)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.progress_bar and acc.is_local_main_process))
        for step, (images, labels) in enumerate(bar):
            images = images.to(acc.device, non_blocking=True)
            labels = labels.to(acc.device, non_blocking=True)
            images = augment_batch(images, generator=gen)
            self.iteration += 1
            with acc.autocast():
                logits = self._forward(self._inputs(images), train=True)
                losses = self.loss_fn(logits, labels, progress=self.iteration / self.total_iterations)
            acc.backward(losses.sum())
            for n in self.nodes:
                if not n.frozen:
                    n.optimizer.step()
                    n.optimizer.zero_grad(set_to_none=True)
            loss_sum += losses.detach().double()
            if step % 25 == 0 and not bar.disable:
                bar.set_postfix_str(" ".join(f"{v:.3f}" for v in (loss_sum / (step + 1)).tolist()))
        bar.close()
        mean = acc.reduce(loss_sum / len(self.train_loader), reduction="mean")
        if not torch.isfinite(mean).all():
            raise FloatingPointError(f"epoch {epoch + 1}: the training loss is not finite ({mean.tolist()}); "
                                     "lower --lr or use --mixed-precision bf16 instead of fp16")
        return mean.tolist()

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Average BatchNorm statistics over processes (DDP syncs gradients, not these)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        import torch.distributed as dist

        for n in self.nodes:
            if n.frozen:
                continue
            for name, buf in n.raw.named_buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(acc.num_processes)

    @torch.no_grad()
    def evaluate(self, split) -> tuple[list[float], float]:
        """Top-1 (%) of every node and of the ensemble (mean of softmaxes) on ``split``."""
        acc = self.accelerator
        for n in self.nodes:
            n.raw.eval()
        m = len(self.nodes)
        correct = torch.zeros(m + 1, dtype=torch.float64, device=acc.device)
        # Each process takes every world-th image, so the split is covered exactly once.
        all_images, all_labels = (self._eval_tensors if split is self.eval_data
                                  else (split.images.to(acc.device), split.labels.to(acc.device)))
        idx = torch.arange(acc.process_index, len(split), acc.num_processes, device=acc.device)
        batch = max(256, self.cfg.batch_size)
        for start in range(0, len(idx), batch):
            sel = idx[start:start + batch]
            images, labels = all_images[sel], all_labels[sel]
            with acc.autocast():
                logits = self._forward(self._inputs(images), train=False)
            probs = torch.zeros(labels.shape[0], logits[0].shape[1], device=acc.device)
            for i, z in enumerate(logits):
                z = z.float()
                correct[i] += (z.argmax(dim=1) == labels).sum()
                probs += z.softmax(dim=1)
            correct[m] += (probs.argmax(dim=1) == labels).sum()
        correct = acc.reduce(correct, reduction="sum")
        top1 = (correct * 100.0 / len(split)).tolist()
        return top1[:m], top1[m]

    # ------------------------------------------------------------------------- the loop
    def fit(self, epoch_callback: Optional[EpochCallback] = None) -> TrainResult:
        acc, cfg = self.accelerator, self.cfg
        main = acc.is_main_process
        if self.output is not None and main:
            self._write_run_files()
        if acc.trackers == [] and "log_with" in self._tracker_kwargs():
            acc.init_trackers("timm_dcl", config=_flat_config(cfg))
        if self.epoch >= cfg.epochs and main:
            acc.print(f"nothing to train: the run already reached epoch {self.epoch} of --epochs {cfg.epochs}")
        try:
            for epoch in range(self.epoch, cfg.epochs):
                start = time.perf_counter()
                train_loss = self._train_epoch(epoch)
                self._sync_buffers()
                top1, ens = self.evaluate(self.eval_data)
                record = {
                    "epoch": epoch + 1,
                    "top1": top1,
                    "ensemble_top1": ens,
                    "train_loss": train_loss,
                    "lr": [lr_at_epoch(cfg, epoch) if not n.frozen else 0.0 for n in self.nodes],
                    "time": round(time.perf_counter() - start, 3),
                    "split": cfg.eval_split,
                }
                self.epoch, improved = epoch + 1, top1[0] > self.best_top1
                if improved:
                    self.best_top1, self.best_epoch = top1[0], epoch + 1
                self.history.append(record)
                if self.output is not None and main:
                    self._save_state("last")
                    if improved and cfg.save_best:
                        self._save_state("best")
                    self._append_metrics(record)
                if acc.trackers:
                    acc.log({f"top1/{i}": v for i, v in enumerate(top1)} | {"top1/ensemble": ens}
                            | {f"loss/{i}": v for i, v in enumerate(train_loss)}, step=epoch + 1)
                if main:
                    acc.print(f"epoch {epoch + 1:>3}/{cfg.epochs}  " + "  ".join(
                        f"{n.index}:{t:6.2f}%" for n, t in zip(self.nodes, top1))
                        + f"  ens:{ens:6.2f}%  loss " + " ".join(f"{v:.3f}" for v in train_loss)
                        + f"  {record['time']:.1f}s")
                if epoch_callback is not None:
                    epoch_callback(record)
            if self.output is not None and main:
                self._save_node_weights()
                self._write_summary()
        finally:
            if acc.trackers:
                acc.end_training()
        acc.wait_for_everyone()
        return TrainResult(history=list(self.history), best_top1=self.best_top1, best_epoch=self.best_epoch,
                           output=self.output)

    # ----------------------------------------------------------------------- outputs
    def _write_run_files(self) -> None:
        from .draw import draw_graph

        self.output.mkdir(parents=True, exist_ok=True)
        self.graph.save(self.output / "graph.json")
        (self.output / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        for suffix in (".png", ".svg"):
            draw_graph(self.graph, self.output / f"graph{suffix}")
        # On resume the checkpoint's history is the truth: a line written after it is dropped.
        self._rewrite_metrics()

    def _rewrite_metrics(self) -> None:
        path = self.output / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(path)
        self._write_csv()

    def _append_metrics(self, record: dict) -> None:
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv()
        from .plots import plot_curves
        plot_curves(self.history, [n.label for n in self.nodes], self.output / "curves.png")

    def _write_csv(self) -> None:
        m = len(self.nodes)
        header = (["epoch"] + [f"top1_{i}" for i in range(m)] + ["ensemble_top1"]
                  + [f"train_loss_{i}" for i in range(m)] + ["lr", "time"])
        with open(self.output / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for r in self.history:
                w.writerow([r["epoch"], *r["top1"], r["ensemble_top1"], *r["train_loss"], max(r["lr"]), r["time"]])

    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "graph": self.graph.to_dict(),
            "num_classes": self.num_classes,
            "models": [None if n.frozen else n.raw.state_dict() for n in self.nodes],
            "optimizers": [None if n.frozen else n.optimizer.state_dict() for n in self.nodes],
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "rng": rng_state(),
            "best": {"top1": self.best_top1, "epoch": self.best_epoch},
            "history": self.history,
        }

    def _save_state(self, which: str) -> None:
        atomic_save(self._state(), self.output / "checkpoints" / f"{which}.pth")

    def _read_resume_state(self) -> dict:
        path = Path(self.cfg.resume) / "checkpoints" / "last.pth"
        if not path.is_file():
            raise FileNotFoundError(f"--resume {self.cfg.resume}: no checkpoint at {path}")
        # Our own file: it holds RNG states (numpy arrays), so the full unpickler is needed.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"--resume {self.cfg.resume}: {path} is not a timm-dcl training checkpoint")
        theirs, ours = Graph.from_dict(state["graph"]).to_dict(), self.graph.to_dict()
        if theirs != ours:
            diff = [k for k in ours if ours.get(k) != theirs.get(k)]
            raise ValueError(f"--resume {self.cfg.resume} holds a different graph (differs in: {', '.join(diff)}); "
                             "resume with the same graph, or omit --node-models/--graph to reuse its graph.json")
        return state

    def _load_state(self, state: dict) -> None:
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"--resume: the checkpoint has {state['num_classes']} classes, "
                             f"this data set {self.num_classes}")
        for n, model_state, opt_state in zip(self.nodes, state["models"], state["optimizers"]):
            if not n.frozen:
                n.raw.load_state_dict(model_state)
                n.optimizer.load_state_dict(opt_state)
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.best_top1, self.best_epoch = state["best"]["top1"], state["best"]["epoch"]
        self.history = list(state["history"])

    def _save_node_weights(self) -> None:
        for n, top1 in zip(self.nodes, self.history[-1]["top1"] if self.history else [None] * len(self.nodes)):
            if n.frozen:
                continue
            save_node_weights(self.output / "nodes" / node_weights_name(n.index, n.spec.model), n.raw,
                              model_name=n.spec.model, model_kwargs=n.spec.model_kwargs,
                              num_classes=self.num_classes, dataset=self.cfg.dataset, top1=top1)

    def _write_summary(self) -> None:
        last = self.history[-1] if self.history else None
        best = {n.index: max((r["top1"][n.index] for r in self.history), default=float("nan")) for n in self.nodes}
        summary = {
            "nodes": [n.spec.model for n in self.nodes],
            "frozen": [n.frozen for n in self.nodes],
            "final_top1": last["top1"] if last else None,
            "best_top1": [best[n.index] for n in self.nodes],
            "final_ensemble_top1": last["ensemble_top1"] if last else None,
            "epochs": self.epoch,
            "split": self.cfg.eval_split,
        }
        (self.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        rows = [f"{'node':<28} {'final top-1':>11} {'best top-1':>10}"]
        for n in self.nodes:
            final = f"{last['top1'][n.index]:.2f}" if last else "-"
            rows.append(f"{n.label:<28} {final:>11} {best[n.index]:>10.2f}")
        if last and len(self.nodes) > 1:
            rows.append(f"{'ensemble':<28} {last['ensemble_top1']:>11.2f}")
        self.accelerator.print("\n".join(rows))


def train_graph(graph: Graph, cfg: TrainConfig, *, data=None, accelerator=None,
                epoch_callback: Optional[EpochCallback] = None) -> TrainResult:
    """Train ``graph`` under ``cfg``; ``epoch_callback(record)`` runs after every epoch.

    ``data`` (a :class:`timm_dcl.data.DataSplits`) skips loading, e.g. when a search
    trains many graphs on the same images. An exception raised by the callback (such
    as ``optuna.TrialPruned``) stops training and propagates.
    """
    return GraphTrainer(graph, cfg, data=data, accelerator=accelerator).fit(epoch_callback)
