"""The run configuration shared by train_dcl.py, search_dcl.py and the trainer.

Defaults are the paper's recipe (SPEC §4). The command-line flags that fill it live in
:mod:`timm_dcl.cli` (re-exported here, where search_dcl.py has always imported them).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "TrainConfig",
    "HelpFormatter",
    "add_data_args",
    "add_train_args",
    "add_graph_args",
    "graph_from_args",
    "parse_model_kwargs",
    "check_dataset_name",
]

DATASETS = ("cifar10", "cifar100", "tiny-imagenet")
# Data sets read from a folder or routed to timm's create_dataset by prefix (timm_dcl.data).
GENERIC_DATASETS = ("folder", "parquet")
DATASET_PREFIXES = ("hfds/", "hfids/", "tfds/", "wds/", "torch/")
# timm's create_scheduler_v2 names that need no validation metric (plateau does).
SCHEDULERS = ("multistep", "cosine", "step", "tanh", "poly")
MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "aim", "mlflow", "all")
RESUME_SCHEDULES = ("replan", "keep")
# timm-dcl: the project's defaults; paper: the authors' released code where it differs (SPEC §8).
RECIPES = ("timm-dcl", "paper")
FROZEN_BN = ("eval", "train")
# how an ensemble node combines its members: mean of logits, or log of the mean of softmaxes
ENSEMBLE_MEANS = ("logits", "probs")


@dataclass
class TrainConfig:
    # data
    dataset: str = "cifar100"
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None
    eval_subset: Optional[int] = None
    val_size: int = 0
    eval_split: str = "test"  # "val" during a search: the test set stays untouched
    workers: int = 4
    in_memory: Optional[bool] = None  # None: decoded in memory when the split fits the budget, else streamed
    img_size: Optional[int] = None
    input_size: Optional[list[int]] = None  # (C, H, W); None: the data's own size, or node 0's pretrained_cfg
    crop_pct: Optional[float] = None
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    # optimisation: timm's factories; the defaults are the paper's recipe (SPEC §4)
    recipe: str = "timm-dcl"  # "paper": the authors' code where the project differs (SPEC §8)
    epochs: int = 200
    batch_size: int = 64
    drop_last: Optional[bool] = None  # None: the recipe's (paper: drop the last partial batch)
    opt: str = "sgd"  # timm's name: "sgd" is SGD with Nesterov momentum
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    opt_filter_bias_bn: bool = False  # the paper decays every parameter; timm's train.py filters
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    sched: str = "multistep"
    sched_on_updates: bool = False
    decay_milestones: Optional[list[int]] = None  # None: the recipe's (see decay_milestones_for)
    decay_epochs: Optional[float] = None  # step: decay every N epochs (None: 30 % of the epochs)
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    resume_schedule: str = "replan"
    seed: int = 0
    frozen_bn: str = "eval"  # "train": frozen nodes' BatchNorm uses batch statistics, as the authors' code
    ensemble_mean: str = "logits"  # ensemble nodes: mean of logits (the authors' code) or "probs"
    # timm's training recipe (timm_dcl/timm_recipe.py): off by default, as the paper
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[list[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    smoothing: float = 0.0
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    color_jitter: Optional[float] = None
    train_interpolation: Optional[str] = None
    grad_accum_steps: int = 1
    # runtime
    edge_stats_every: int = 10  # edge diagnostics from every N-th training batch; 0: none
    eval_every: int = 1  # evaluate every N-th epoch (and always the last)
    mixed_precision: Optional[str] = None  # None: whatever the accelerate config says
    channels_last: Optional[bool] = None  # None: on for CPU and for mixed precision, where oneDNN/cuDNN prefer NHWC
    compile: bool = False
    output: Optional[str] = None  # None: write nothing (search trials may)
    resume: Optional[str] = None
    log_with: Optional[str] = None  # an Accelerate tracker; None: none
    progress_bar: bool = True
    save_best: bool = True
    model_ema: bool = False  # an EMA (timm's ModelEmaV3) of every trainable node
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    checkpoint_every_steps: Optional[int] = None  # last.pth every N steps mid-epoch; None: at epoch ends only
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_dataset_name(self.dataset)
        if self.dataset in GENERIC_DATASETS and not self.data_dir:
            raise ValueError(f"--dataset {self.dataset} needs --data-dir DIR")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        for name in ("train_subset", "eval_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
        if self.val_size < 0:
            raise ValueError(f"--val-size must be ≥ 0, got {self.val_size}")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {self.eval_split!r}")
        if self.eval_split == "val" and self.val_size < 1:
            raise ValueError("evaluating on the validation split needs --val-size ≥ 1")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be ≥ 0, got {self.weight_decay}")
        if self.sched not in SCHEDULERS:
            raise ValueError(f"--sched must be one of {', '.join(SCHEDULERS)}, got {self.sched!r}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ValueError(f"--warmup-epochs must be ≥ 0 and below --epochs ({self.epochs}), got {self.warmup_epochs}")
        for name in ("warmup_lr", "min_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        if self.decay_epochs is not None and not self.decay_epochs > 0:
            raise ValueError(f"--decay-epochs must be > 0, got {self.decay_epochs}")
        if self.decay_milestones is not None and any(int(m) < 1 for m in self.decay_milestones):
            raise ValueError(f"--decay-milestones must be epochs ≥ 1, got {self.decay_milestones}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"--clip-grad must be > 0, got {self.clip_grad}")
        if self.clip_mode not in ("norm", "value", "agc"):
            raise ValueError(f"--clip-mode must be norm, value or agc, got {self.clip_mode!r}")
        if not isinstance(self.opt, str) or not self.opt.strip():
            raise ValueError(f"--opt must name an optimiser, got {self.opt!r}")
        if self.resume_schedule not in RESUME_SCHEDULES:
            raise ValueError(f"--resume-schedule must be replan or keep, got {self.resume_schedule!r}")
        if self.log_with is not None and self.log_with not in TRACKERS:
            raise ValueError(f"--log-with must be one of {', '.join(TRACKERS)}, got {self.log_with!r}")
        if self.img_size is not None and self.input_size is not None:
            raise ValueError("give either --img-size or --input-size, not both")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"--img-size must be ≥ 1, got {self.img_size}")
        if self.input_size is not None:
            if len(self.input_size) != 3 or any(int(v) < 1 for v in self.input_size):
                raise ValueError(f"--input-size must be C H W, three positive integers, got {self.input_size}")
            if int(self.input_size[0]) != 3:
                raise ValueError(f"--input-size: the trainer feeds RGB images, so C must be 3, got {self.input_size[0]}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"--crop-pct must lie in (0, 1], got {self.crop_pct}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be ≥ 0, got {self.workers}")
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.frozen_bn not in FROZEN_BN:
            raise ValueError(f"--frozen-bn must be eval or train, got {self.frozen_bn!r}")
        if self.ensemble_mean not in ENSEMBLE_MEANS:
            raise ValueError(f"--ensemble-mean must be logits or probs, got {self.ensemble_mean!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"--eval-every must be an integer ≥ 1, got {self.eval_every!r}")
        d = self.model_ema_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ValueError(f"--model-ema-decay must be a number in [0, 1), got {d!r}")
        n = self.checkpoint_every_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"--checkpoint-every-steps must be an integer ≥ 1, got {n!r}")
        if int(self.edge_stats_every) < 0:
            raise ValueError(f"--edge-stats-every must be ≥ 0 (0: no edge diagnostics), got {self.edge_stats_every}")
        from .timm_recipe import check_timm_recipe
        check_timm_recipe(self)

    @property
    def requested_input_size(self) -> Optional[tuple[int, int, int]]:
        """The input size the user asked for (``--img-size``/``--input-size``), else None."""
        if self.input_size is not None:
            return tuple(int(v) for v in self.input_size)  # type: ignore[return-value]
        if self.img_size is not None:
            return (3, int(self.img_size), int(self.img_size))
        return None

    @property
    def milestones(self) -> list[int]:
        return self.decay_milestones_for(self.epochs)

    def decay_milestones_for(self, epochs: int) -> list[int]:
        """Multistep decay epochs (0-based: the first epoch at the decayed lr) of a run of ``epochs``.

        Unless ``decay_milestones`` says: 0-based round(0.3/0.6/0.9 · epochs) (60, 120, 180 of
        200, so 1-based epoch 61 is the first at 0.01); the paper recipe decays one epoch
        earlier, once the 1-based epoch reaches them, as the authors' code did (59, 119, 179).
        """
        if self.decay_milestones:
            return sorted(int(m) for m in self.decay_milestones)
        shift = 1 if self.recipe == "paper" else 0
        return [max(1, round(epochs * f) - shift) for f in (0.3, 0.6, 0.9)]

    @property
    def paper(self) -> bool:
        return self.recipe == "paper"

    @property
    def drops_last_batch(self) -> bool:
        """``drop_last`` as given, else the recipe's: the authors dropped the last partial batch."""
        return self.paper if self.drop_last is None else bool(self.drop_last)

    @property
    def normalises_inputs(self) -> bool:
        """The project feeds each node its own pretrained_cfg mean/std; the authors fed [0, 1]."""
        return not self.paper

    def gate_iterations(self, *, train_images: int, iterations_per_epoch: int, epochs: int) -> int:
        """K of the linear gates' k/K: the run's iterations, so the weight ends at 1; the paper
        recipe takes the authors' K = (⌊N/B⌋ + 1) · epochs (N: this process's training images),
        so with the last batch dropped it ends just below 1 (SPEC §8)."""
        if self.paper:
            return (train_images // self.batch_size + 1) * epochs
        return iterations_per_epoch * epochs

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_dataset_name(name: str) -> str:
    """A named data set, ``folder``, ``parquet`` or a timm prefix (``hfds/<hub id>``, ...)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--dataset must name a data set, got {name!r}")
    if name in DATASETS or name in GENERIC_DATASETS:
        return name
    for prefix in DATASET_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS + GENERIC_DATASETS)} or a timm data set "
                     f"with a prefix ({', '.join(p + '<name>' for p in DATASET_PREFIXES)}), got {name!r}")


#: The fields that decide what a run learns (data split and recipe): runs or trials that
#: differ in one of them are not comparable (the search's study settings, its report runs).
RECIPE_FIELDS = ("train_subset", "val_size", "img_size", "input_size", "crop_pct", "in_memory", "epochs", "batch_size",
                 "opt", "lr", "momentum", "nesterov", "weight_decay", "opt_filter_bias_bn", "clip_grad", "clip_mode",
                 "sched", "sched_on_updates", "decay_milestones", "decay_epochs", "decay_rate", "warmup_epochs",
                 "warmup_lr", "min_lr", "seed", "recipe", "drop_last", "frozen_bn",
                 "ensemble_mean", "model_ema_decay", "model_ema_warmup", "mixup", "cutmix", "cutmix_minmax", "mixup_prob",
                 "mixup_switch_prob", "mixup_mode", "mixup_off_epoch", "smoothing", "aa", "reprob", "remode", "recount",
                 "color_jitter", "train_interpolation", "grad_accum_steps")


# The flags: defined in timm_dcl.cli, importable from here as they always were.
from .cli import (HelpFormatter, add_data_args, add_graph_args, add_train_args,  # noqa: E402
                  graph_from_args, parse_model_kwargs)
