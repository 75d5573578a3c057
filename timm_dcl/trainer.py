"""Trains a Knowledge Transfer Graph with Accelerate: every node at once, one loss op.

Data flows one way: config → graph → trainer → :class:`~timm_dcl.task.KTGTask` (the graph's
forward and loss, defined there alone). One backward pass of ``Σ_t L_t`` gives every node exactly
its own gradient, because the loss detaches every edge's source (SPEC §2); one step of
:class:`~timm_dcl.recipe.NodeOptimizers` then updates every trainable node, each with its own
timm optimiser, under one lr schedule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .config import TrainConfig
from .edge_stats import EdgeStats
from .accumulation import Accumulation
from .ema import EmaState, ema_node_indices
from .gates import Gate
from .graph import Graph
from .nodes import check_models_run, create_node_model, resolve_eval_crop, resolve_input_size
from .preemption import MidEpochState, StopSignals, skip_batches
from .recipe import GateClock, NodeOptimizers, build_node_optimizer, build_scheduler, check_optimizer_names
from .run_state import STATE_FORMAT, RunState  # noqa: F401  (STATE_FORMAT: part of this module's API)
from .recipe import lr_at_epoch  # noqa: F401  (part of this module's API since the first release)
from . import run_files
from .safe_io import check_output_dir
from .task import KTGTask, ensemble_logits

__all__ = ["train_graph", "GraphTrainer", "TrainResult", "lr_at_epoch", "build_run_data", "ensemble_logits",
           "node_init_seed"]

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


class _Node:
    """One node at run time, as the task holds it: its module, how it sees the input, and its
    optimiser's index. An ensemble node has no module (``raw`` is None), only its ``members``; an
    EMA node neither (``is_ensemble`` is true of both: virtual), only ``ema_of``."""

    def __init__(self, index: int, spec, task: KTGTask):
        self.index = index
        self.spec = spec
        self.task = task
        self.opt_index: Optional[int] = None  # its optimiser inside NodeOptimizers

    @property
    def raw(self) -> Optional[nn.Module]:  # unwrapped: state_dict, evaluation
        return self.task.node_module(self.index)

    @property
    def train_model(self) -> Optional[nn.Module]:  # DDP-wrapped and/or with features, for training
        return self.task.train_module(self.index)

    @property
    def frozen(self) -> bool:
        return self.task.frozen[self.index]

    @property
    def members(self) -> tuple[int, ...]:
        return self.task.members[self.index]

    @property
    def norm_key(self):
        return self.task.norm_keys[self.index]

    @property
    def ema_of(self) -> Optional[int]:
        return self.task.ema_of[self.index]

    @property
    def is_ensemble(self) -> bool:
        return self.raw is None

    @property
    def trains(self) -> bool:
        return not self.frozen and not self.is_ensemble

    @property
    def label(self) -> str:
        if self.ema_of is not None:
            return f"{self.index}: EMA of {self.ema_of}"
        if self.is_ensemble:
            return f"{self.index}: ensemble of " + "+".join(map(str, self.members))
        return f"{self.index}: {self.spec.model}" + (" (frozen)" if self.frozen else "")


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}


class GraphTrainer(RunState, EmaState, MidEpochState):
    def __init__(self, graph: Graph, cfg: TrainConfig, *, data=None, accelerator=None):
        self.graph = graph
        self.cfg = cfg
        self.output = Path(cfg.output) if cfg.output else (Path(cfg.resume) if cfg.resume else None)
        resume_state = self._read_resume_state() if cfg.resume else None
        # Everything that can be checked without the data is checked before it is loaded.
        graph.check_models()
        self._check_rows()
        check_optimizer_names(graph, cfg)
        target = graph.reference_model
        self.input_size = tuple(data.input_size) if data is not None else resolve_input_size(cfg, target)
        check_models_run(graph, self.input_size)
        if self.output is not None:  # a folder the run cannot write fails now, not after the data loads
            check_output_dir(self.output, "--output" if cfg.output else "--resume")

        if accelerator is None:
            from accelerate import Accelerator
            accelerator = Accelerator(mixed_precision=cfg.mixed_precision, **self._tracker_kwargs())
        self.accelerator = acc = accelerator
        if acc.device.type == "cuda":
            # Shapes never change within a run: let cuDNN pick its fastest algorithms.
            torch.backends.cudnn.benchmark = True
        from accelerate.utils import set_seed
        set_seed(cfg.seed)  # the same initial weights on every rank

        if data is None:
            data = self._load_data()
        self.data = data
        self.channels_last = (cfg.channels_last if cfg.channels_last is not None
                              else acc.device.type == "cpu" or acc.mixed_precision in ("fp16", "bf16"))
        self.num_classes = data.num_classes
        self.eval_name = "val" if cfg.eval_split == "val" else "eval"
        self.eval_data = data.val if cfg.eval_split == "val" else data.eval
        if self.eval_data is None:
            raise ValueError("evaluation on the validation split needs --val-size ≥ 1")

        models = [None if spec.is_virtual else self._build_model(i, spec) for i, spec in enumerate(graph.nodes)]
        # The EMAs (ema.py) live in the task, whose forward reads them for the ema:N nodes.
        self.task = KTGTask.from_graph(graph, models, num_classes=self.num_classes, ensemble_mean=cfg.ensemble_mean,
                                       normalise=cfg.normalises_inputs, channels_last=self.channels_last,
                                       frozen_bn_train=self._frozen_bn_train, ema_nodes=ema_node_indices(graph, cfg),
                                       ema_decay=cfg.model_ema_decay, ema_warmup=cfg.model_ema_warmup, verbose=False)
        self.nodes = [_Node(i, spec, self.task) for i, spec in enumerate(graph.nodes)]
        on_gpu = acc.device.type != "cpu"
        self.train_loader = data.train_loader(cfg.batch_size, seed=cfg.seed, num_shards=acc.num_processes,
                                              shard_index=acc.process_index, device=acc.device if on_gpu else None,
                                              workers=cfg.workers, drop_last=cfg.drops_last_batch)
        self._eval_loaders: dict = {}
        if len(self.train_loader) == 0:
            raise ValueError(f"the training split ({len(data.train)} images) gives no "
                             f"{'full ' if cfg.drops_last_batch else ''}batch of {cfg.batch_size} on each of "
                             f"{acc.num_processes} processes")
        self.accum = Accumulation(cfg.grad_accum_steps, len(self.train_loader))
        self.planned_epochs = cfg.epochs
        self.clock = GateClock(end_iteration=self._gate_iterations(cfg.epochs))
        self.edge_record: dict = {}  # the last epoch's edge diagnostics (edge_stats.py)
        self.feature_record: dict = {}  # the last epoch's mean feature-edge loss per node
        self._prepare()
        # Dropout, drop-path and augmentation differ between ranks: seed + rank (set_seed adds it).
        set_seed(cfg.seed, device_specific=True)
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict] = []
        self.best_top1, self.best_epoch = float("-inf"), 0
        if resume_state is not None:
            self._load_state(resume_state)

    @property
    def total_iterations(self) -> int:
        return self.clock.end_iteration

    def _gate_iterations(self, epochs: int) -> int:
        per_shard = len(self.data.train) // self.accelerator.num_processes
        return self.cfg.gate_iterations(train_images=per_shard, iterations_per_epoch=self.accum.updates_per_epoch,
                                        epochs=epochs)

    @property
    def _frozen_bn_train(self) -> bool:
        return self.cfg.frozen_bn == "train"

    @property
    def loss_fn(self):
        return self.task.loss_fn

    @loss_fn.setter
    def loss_fn(self, fn) -> None:
        # Any callable (logits, labels, progress=) may stand in, e.g. to watch what the loss gets.
        del self.task.loss_fn
        self.task.loss_fn = fn

    @property
    def feature_loss(self):
        return self.task.feature_loss

    # ----------------------------------------------------------------------------- setup
    def _tracker_kwargs(self) -> dict:
        if self.output is None or self.cfg.log_with is None:
            return {}
        return {"log_with": self.cfg.log_with, "project_dir": str(self.output)}

    def _load_data(self):
        from .timm_recipe import streaming_reason
        if streaming_reason(self.cfg) and self.cfg.in_memory is None:
            self.accelerator.print(f"{streaming_reason(self.cfg)} is a per-image transform: the data streams "
                                   "through DataLoader workers instead of being decoded into memory")
        with self.accelerator.main_process_first():
            return build_run_data(self.cfg, self.graph.reference_model)

    def _check_rows(self) -> None:
        m = self.graph.num_nodes
        codes = self.graph.gate_codes
        for t, spec in enumerate(self.graph.nodes):
            row_cut = all(codes[t * m + s] == Gate.CUTOFF for s in range(m))
            if spec.is_virtual and not row_cut:
                raise ValueError(f"node {t} is virtual ({spec.model}), so it learns nothing: its gate row must be "
                                 "all cutoff")
            if row_cut and not spec.frozen and not spec.is_virtual:
                raise ValueError(
                    f"node {t} ({spec.model}) has an all-cutoff gate row, so it would learn nothing: "
                    "give it a checkpoint (a frozen pre-trained node) or open one of its gates")

    def _build_model(self, index: int, spec) -> nn.Module:
        # Each node's random initialisation depends on (seed, its index) alone, not on the nodes
        # built before it: seed k of two graphs that share node 0's model starts node 0 from the
        # same weights, so their runs differ only by the graph (the report pairs them by seed).
        torch.manual_seed(node_init_seed(self.cfg.seed, index))
        model = create_node_model(spec, index, num_classes=self.num_classes, input_size=self.input_size,
                                  log=self.accelerator.print, paper_init=self.cfg.paper)
        if spec.frozen:
            model.eval().requires_grad_(False)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _prepare(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        trainable = [n for n in self.nodes if n.trains]
        for i, n in enumerate(trainable):
            n.opt_index = i
        self.node_optimizers = NodeOptimizers([build_node_optimizer(n.raw, n.spec, cfg) for n in trainable],
                                              names=[str(n.index) for n in trainable])
        # Frozen teachers are never wrapped in DDP: they have no gradients to synchronise. A node in
        # a feature edge is prepared inside WithFeatures, so that DDP sees the forward that makes them.
        prepared = acc.prepare(*[n.train_model for n in trainable], self.node_optimizers)
        if not isinstance(prepared, tuple):
            prepared = (prepared,)
        for n, model in zip(trainable, prepared[:len(trainable)]):
            self.task.set_train_module(n.index, model)
        self.optimizer = prepared[-1]
        self.scheduler = build_scheduler(self.node_optimizers, cfg, epochs=self.planned_epochs,
                                         updates_per_epoch=self.accum.updates_per_epoch)
        self.task.to(acc.device)  # the frozen nodes, the EMAs and the task's buffers; Accelerate placed the others
        # --compile compiles the whole step (normalisation, every node's forward, the loss op)
        # as one graph, rather than each model alone; progress is the task's tensor buffer, so
        # the linear gates' changing weight does not recompile it (the backward is compiled with it).
        self._train_step = torch.compile(self._forward_loss) if cfg.compile else self._forward_loss
        self._setup_emas()
        from .mixing import build_batch_mixing  # mixup/CutMix, label smoothing, random erasing
        self.batch_mixing = build_batch_mixing(cfg, self.num_classes, *self.task.pixel_stats())

    def node_lrs(self) -> list[float]:
        """Each node's learning rate as its optimiser holds it now (0 for frozen and ensemble nodes)."""
        return [0.0 if not n.trains else float(self.node_optimizers.groups_of(n.opt_index)[0]["lr"])
                for n in self.nodes]

    # ------------------------------------------------------------------------- one step
    def _inputs(self, images: torch.Tensor) -> dict:
        """The batch as each distinct (mean, std) sees it, normalised once per group. The loaders
        give uint8 pixels and batch mixing keeps pixel units in float, so both are pixels."""
        return self.task.node_inputs(images, pixels=True)

    def _forward(self, inputs: dict, *, train: bool) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """Every node's logits and (training only) the features of the nodes in feature edges."""
        return self.task.run_nodes(inputs, train=train)

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor, progress=None):
        """One training forward: every node's logits, the per-node losses ``[M]`` (logit edges plus
        feature edges) and the feature edges' share of them (None without feature edges).
        ``progress``: k/K, else what the task holds (the loop sets it outside a compiled step)."""
        if progress is not None:
            self.task.set_progress(progress)
        out = self.task.forward_inputs(self._inputs(images), labels)
        return out["logits"], out["losses"], out.get("feature_losses")

    def _clip_gradients(self) -> None:
        from timm.utils import dispatch_clip_grad

        # Unscale once (fp16), then clip every node on its own: the nodes are separate networks.
        self.accelerator.unscale_gradients()
        for n in self.nodes:
            if n.trains:
                dispatch_clip_grad(n.raw.parameters(), self.cfg.clip_grad, mode=self.cfg.clip_mode)

    def _train_epoch(self, epoch: int) -> list[float]:
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        # --frozen-bn train: a frozen node's BatchNorm on batch statistics (its running ones
        # drift), as in the authors' code; it still gets no gradient and no update.
        self.task.train()
        self.train_loader.set_epoch(epoch)
        self.scheduler.step(epoch)
        if cfg.sched_on_updates:
            self.scheduler.step_update(self.iteration)
        # Read here: with --sched-on-updates the lr after the last step is already the next one's.
        self.epoch_lrs = self.node_lrs()
        # Augmentation randomness depends only on (seed, epoch, rank): a resume replays it exactly.
        gen = torch.Generator(device=acc.device)
        gen.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + acc.process_index)
        loss_sum = torch.zeros(len(self.nodes), dtype=torch.float64, device=acc.device)
        feature_sum = torch.zeros_like(loss_sum)
        every = cfg.edge_stats_every
        edges = EdgeStats(self.graph.gate_codes, len(self.nodes), self.graph.temperature, acc.device) if every else None
        start = self._resume_position(epoch, gen, (loss_sum, feature_sum), edges)  # 0 unless mid-epoch
        bar = tqdm(skip_batches(self.train_loader, start), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   dynamic_ncols=True, disable=not (cfg.progress_bar and acc.is_local_main_process),
                   total=len(self.train_loader), initial=start)
        for step, (images, labels) in enumerate(bar, start=start):
            images = images.to(acc.device, non_blocking=True)
            labels = labels.to(acc.device, non_blocking=True)
            images = self.train_loader.augment(images, gen)
            if self.batch_mixing is not None:  # soft targets [B, C] from here on
                images, labels = self.batch_mixing(images, labels, epoch)
            if self.accum.starts_update(step):  # k counts optimiser updates
                self.iteration += 1
                progress = self.clock.progress(self.iteration)
                self.task.set_progress(progress)  # a buffer: a compiled step reads it, never recompiles
            with self.accum.context(acc, [n.train_model for n in self.nodes if n.trains], step):
                with acc.autocast():
                    logits, losses, feature_losses = self._train_step(images, labels)
                if edges is not None and step % every == 0:  # outside autocast: float32 statistics
                    edges.add(logits, labels.argmax(dim=1) if labels.dim() == 2 else labels, progress)
                acc.backward(losses.sum() * self.accum.loss_scale(step) if self.accum.steps > 1 else losses.sum())
            if self.accum.ends_update(step):
                if cfg.clip_grad is not None:
                    self._clip_gradients()
                self.optimizer.step()  # every node at once: one GradScaler update per iteration
                self.optimizer.zero_grad(set_to_none=True)
                self._update_emas()
                if cfg.sched_on_updates:
                    self.scheduler.step_update(self.iteration)
            loss_sum += losses.detach().double()
            if feature_losses is not None:
                feature_sum += feature_losses.detach().double()
            if self.accum.ends_update(step):  # a checkpoint inside an accumulation group would lose its gradients
                self._after_step(epoch, step + 1, gen, (loss_sum, feature_sum), edges)  # may checkpoint, or stop
            if step % 25 == 0 and not bar.disable:
                bar.set_postfix_str(" ".join(f"{v:.3f}" for v in (loss_sum / (step + 1)).tolist()))
        bar.close()
        self.edge_record = edges.record(lambda x: acc.reduce(x, reduction="sum")) if edges is not None else {}
        mean = acc.reduce(loss_sum / len(self.train_loader), reduction="mean")
        if not torch.isfinite(mean).all():
            raise FloatingPointError(f"epoch {epoch + 1}: the training loss is not finite ({mean.tolist()}); "
                                     "lower --lr or use --mixed-precision bf16 instead of fp16")
        self.feature_record = ({} if self.feature_loss is None else
                               {"feature_loss": acc.reduce(feature_sum / len(self.train_loader), reduction="mean").tolist()})
        return mean.tolist()

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Average BatchNorm statistics over processes (DDP syncs gradients, not these)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        import torch.distributed as dist

        for n in self.nodes:
            if n.is_ensemble or (n.frozen and not self._frozen_bn_train):
                continue
            for name, buf in n.raw.named_buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(acc.num_processes)

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> tuple[list[float], float]:
        """Top-1 (%) of every node and of the ensemble of all networks (mean of softmaxes; ensemble
        nodes left out) on ``split`` (``"eval"``: the test/valid split, ``"val"``: the held-out
        validation split). An ensemble node's top-1 is that of the logits it teaches with."""
        acc = self.accelerator
        for n in self.nodes:
            if not n.is_ensemble:
                n.raw.eval()
        m = len(self.nodes)
        correct = torch.zeros(m + 1, dtype=torch.float64, device=acc.device)
        count = torch.zeros((), dtype=torch.float64, device=acc.device)
        if split not in self._eval_loaders:
            self._eval_loaders[split] = self.data.eval_loader(
                split, batch_size=max(256, self.cfg.batch_size), num_shards=acc.num_processes,
                shard_index=acc.process_index, device=acc.device if acc.device.type != "cpu" else None,
                workers=self.cfg.workers)
        for images, labels in self._eval_loaders[split]:
            images, labels = images.to(acc.device), labels.to(acc.device)
            with acc.autocast():
                logits, _ = self._forward(self._inputs(images), train=False)
            probs = torch.zeros(labels.shape[0], logits[0].shape[1], device=acc.device)
            for i, z in enumerate(logits):
                z = z.float()
                correct[i] += (z.argmax(dim=1) == labels).sum()
                if not self.nodes[i].is_ensemble:
                    probs += z.softmax(dim=1)
            correct[m] += (probs.argmax(dim=1) == labels).sum()
            count += labels.shape[0]
        correct, count = acc.reduce(correct, reduction="sum"), acc.reduce(count, reduction="sum")
        top1 = (correct * 100.0 / count).tolist()
        return top1[:m], top1[m]

    # ------------------------------------------------------------------------- the loop
    def fit(self, epoch_callback: Optional[EpochCallback] = None) -> TrainResult:
        acc, cfg = self.accelerator, self.cfg
        main = acc.is_main_process
        if self.output is not None and main:
            run_files.write_run_files(self.output, self.graph, cfg)
            run_files.rewrite_metrics(self.output, self.history, len(self.nodes))
        if "log_with" in self._tracker_kwargs():
            acc.init_trackers("timm_dcl", config=_flat_config(cfg))
        if self.epoch >= cfg.epochs and main:
            acc.print(f"nothing to train: the run already reached epoch {self.epoch} of --epochs {cfg.epochs}")
        try:
            for epoch in range(self.epoch, cfg.epochs):
                start = time.perf_counter()
                train_loss = self._train_epoch(epoch)
                lrs = self.epoch_lrs  # as the optimisers held them for the epoch's first step
                self._sync_buffers()
                evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
                top1, ens = self.evaluate(self.eval_name) if evaluated else (None, None)
                record = {
                    "epoch": epoch + 1,
                    "top1": top1,
                    "ensemble_top1": ens,
                    "train_loss": train_loss,
                    "lr": lrs,
                    "time": round(time.perf_counter() - start, 3),
                    "split": cfg.eval_split,
                    **self.feature_record,
                    **self.edge_record,
                    **(self._ema_record(self.eval_name) if evaluated else {}),
                    **({} if self.batch_mixing is None else self.batch_mixing.record(epoch)),
                }
                self.epoch, improved = epoch + 1, evaluated and top1[0] > self.best_top1
                if improved:
                    self.best_top1, self.best_epoch = top1[0], epoch + 1
                self.history.append(record)
                rng = self._rng_states()  # a collective: every rank takes part
                self._save_state("last", rng)
                if self.output is not None and main:
                    if improved and cfg.save_best:
                        self._save_state("best", rng)
                    run_files.append_metrics(self.output, record, self.history, [n.label for n in self.nodes])
                if acc.trackers:
                    acc.log(({f"top1/{i}": v for i, v in enumerate(top1)} | {"top1/ensemble": ens} if evaluated else {})
                            | {f"loss/{i}": v for i, v in enumerate(train_loss)}
                            | {f"lr/{i}": v for i, v in enumerate(lrs)}, step=epoch + 1)
                if main:
                    accuracy = ("  ".join(f"{n.index}:{t:6.2f}%" for n, t in zip(self.nodes, top1))
                                + f"  ens:{ens:6.2f}%") if evaluated else "(not evaluated)"
                    acc.print(f"epoch {epoch + 1:>3}/{cfg.epochs}  {accuracy}  loss "
                              + " ".join(f"{v:.3f}" for v in train_loss)
                        + f"  {record['time']:.1f}s")
                if epoch_callback is not None:
                    epoch_callback(record)
            if self.output is not None and main:
                self._save_node_weights()
                run_files.write_summary(self.output, self.history, self.nodes, epochs=self.epoch,
                                        split=cfg.eval_split, printer=acc.print)
        finally:
            if acc.trackers:
                acc.end_training()
        acc.wait_for_everyone()
        return TrainResult(history=list(self.history), best_top1=self.best_top1, best_epoch=self.best_epoch,
                           output=self.output)


def node_init_seed(seed: int, index: int) -> int:
    """The torch seed node ``index`` of a run seeded ``seed`` is initialised under (a mix of both, so
    node 1 of seed k is not node 0 of seed k + 1)."""
    return (int(seed) * 1_000_003 + 7_919 * (int(index) + 1)) % (2**63 - 1)


def build_run_data(cfg: TrainConfig, target_model: str, *, val_size: Optional[int] = None):
    """The data of a run: ``cfg``'s data set at the run's input size (``--img-size``, the data's
    own, or node 0's pretrained_cfg), with node 0's evaluation crop unless ``--crop-pct`` says."""
    from .data import build_data

    from .timm_recipe import needs_streaming

    crop_pct, interpolation = resolve_eval_crop(cfg, target_model)
    return build_data(cfg.dataset, data_dir=cfg.data_dir, train_subset=cfg.train_subset,
                      eval_subset=cfg.eval_subset, val_size=cfg.val_size if val_size is None else val_size,
                      seed=cfg.seed, num_workers=cfg.workers,
                      in_memory=False if needs_streaming(cfg) else cfg.in_memory,
                      input_size=resolve_input_size(cfg, target_model), crop_pct=crop_pct,
                      interpolation=interpolation, train_split=cfg.train_split, val_split=cfg.val_split,
                      image_column=cfg.image_column, label_column=cfg.label_column,
                      train_options=dict(auto_augment=cfg.aa, color_jitter=cfg.color_jitter,
                                         train_interpolation=cfg.train_interpolation))


def train_graph(graph: Graph, cfg: TrainConfig, *, data=None, accelerator=None,
                epoch_callback: Optional[EpochCallback] = None) -> TrainResult:
    """Train ``graph`` under ``cfg``; ``epoch_callback(record)`` runs after every epoch.

    ``data`` (a :class:`timm_dcl.data.DataSplits`) skips loading, e.g. when a search
    trains many graphs on the same images. An exception raised by the callback (such
    as ``optuna.TrialPruned``) stops training and propagates. SIGTERM or SIGUSR1 stop the run
    at the next step, its ``last.pth`` written: :class:`~timm_dcl.preemption.Preempted`.
    """
    with StopSignals():
        return GraphTrainer(graph, cfg, data=data, accelerator=accelerator).fit(epoch_callback)
