"""Command-line flags and the run configuration, shared by train_dcl.py and search_dcl.py.

Flags follow timm's ``train.py`` (kebab-case: ``--epochs``, ``--lr``, ``--output``,
``--resume``); defaults are the paper's recipe (SPEC §4).
"""
from __future__ import annotations

import argparse
import ast
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
]

DATASETS = ("cifar10", "cifar100", "tiny-imagenet")
SCHEDULERS = ("multistep", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it, or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


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
    # optimisation (one SGD per trainable node, SPEC §4)
    epochs: int = 200
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    sched: str = "multistep"
    decay_milestones: Optional[list[int]] = None  # None: 30/60/90 % of the epochs (60, 120, 180 of 200)
    decay_rate: float = 0.1
    seed: int = 0
    # runtime
    mixed_precision: Optional[str] = None  # None: whatever the accelerate config says
    channels_last: Optional[bool] = None  # None: on for CPU and for mixed precision, where oneDNN/cuDNN prefer NHWC
    compile: bool = False
    output: Optional[str] = None  # None: write nothing (search trials may)
    resume: Optional[str] = None
    progress_bar: bool = True
    save_best: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
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
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be ≥ 0, got {self.weight_decay}")
        if self.sched not in SCHEDULERS:
            raise ValueError(f"--sched must be one of {', '.join(SCHEDULERS)}, got {self.sched!r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be ≥ 0, got {self.workers}")

    @property
    def milestones(self) -> list[int]:
        if self.decay_milestones:
            return sorted(int(m) for m in self.decay_milestones)
        return [max(1, round(self.epochs * f)) for f in (0.3, 0.6, 0.9)]

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=DATASETS,
                   help="data set; from the Hugging Face hub unless --data-dir is given (default: cifar100)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="offline copy in the hub's parquet layout (train.parquet, test.parquet)")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a fixed, seeded, class-balanced subset of N images")
    g.add_argument("--eval-subset", type=int, default=None, metavar="N",
                   help="evaluate on a fixed, class-balanced subset of N test images")
    g.add_argument("--val-size", type=int, default=0, metavar="N",
                   help="hold out N training images as a validation split")
    g.add_argument("--workers", "-j", type=int, default=4, metavar="N",
                   help="processes that decode the images (once; the decoded set is cached)")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training (defaults: the paper's recipe)")
    g.add_argument("--epochs", type=int, default=200, help="training epochs")
    g.add_argument("--batch-size", "-b", type=int, default=64, help="per process")
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate of every node")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD Nesterov momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    g.add_argument("--sched", default="multistep", choices=SCHEDULERS, help="learning-rate schedule, per epoch")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=None, metavar="EPOCH",
                   help="multistep decay epochs (default: 30/60/90%% of --epochs)")
    g.add_argument("--decay-rate", type=float, default=0.1, help="multistep factor")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, subsets, order and augmentation")
    g.add_argument("--mixed-precision", default=None, choices=MIXED_PRECISION,
                   help="overrides the accelerate config")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on for CPU and mixed precision)")
    g.add_argument("--compile", action="store_true", help="torch.compile every node")
    g.add_argument("--no-progress", dest="progress_bar", action="store_false", help="no tqdm bars")


def add_graph_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("graph")
    g.add_argument("--node-models", default=None, metavar="A,B,...",
                   help="comma-separated timm model names, node 0 (the target) first")
    g.add_argument("--gates", default=None, metavar="ROWS",
                   help='gate matrix, rows split by ";": row t lists the gates of the edges into '
                        'node t, sources in node order, e.g. "through,cutoff;correct,through"')
    g.add_argument("--preset", default=None, choices=("dml", "kd", "independent"),
                   help="a classic graph instead of --gates (default: dml)")
    g.add_argument("--checkpoints", default=None, metavar="P,,Q",
                   help="comma-separated checkpoint per node (empty slot: none); a node with a "
                        "checkpoint and an all-cutoff row is frozen")
    g.add_argument("--temperature", type=float, default=None,
                   help="temperature of the knowledge edges (default 1; kd: 2)")
    g.add_argument("--model-kwargs", action="append", default=[], metavar="N:KEY=VALUE,...",
                   help="keyword arguments of node N's model, e.g. 1:img_size=32,patch_size=4 "
                        "(repeatable; 'all:' applies to every node)")
    g.add_argument("--graph", default=None, metavar="FILE", help="a graph JSON file (e.g. best_graph.json)")


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_model_kwargs(items: list[str], num_nodes: int) -> list[dict[str, Any]]:
    """``["1:img_size=32,patch_size=4", "all:drop_rate=0.1"]`` → one kwargs dict per node."""
    per_node: list[dict[str, Any]] = [{} for _ in range(num_nodes)]
    for item in items:
        where, sep, body = item.partition(":")
        if not sep:
            raise ValueError(f"--model-kwargs {item!r}: expected N:KEY=VALUE[,KEY=VALUE] or all:KEY=VALUE")
        if where == "all":
            targets = range(num_nodes)
        else:
            try:
                targets = [int(where)]
            except ValueError:
                raise ValueError(f"--model-kwargs {item!r}: {where!r} is not a node index") from None
            if not 0 <= targets[0] < num_nodes:
                raise ValueError(f"--model-kwargs {item!r}: node {where} does not exist (graph has {num_nodes} nodes)")
        for pair in filter(None, (p.strip() for p in body.split(","))):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--model-kwargs {item!r}: {pair!r} is not KEY=VALUE")
            for t in targets:
                per_node[t][key.strip()] = _literal(value.strip())
    return per_node


def graph_from_args(args: argparse.Namespace):
    """The graph a command line describes: --graph FILE, or --node-models with gates/preset."""
    from .graph import Graph

    if args.graph:
        if args.node_models or args.gates or args.preset:
            raise ValueError("give either --graph FILE or --node-models/--gates/--preset, not both")
        graph = Graph.load(args.graph)
        if args.temperature is not None:
            graph.temperature = args.temperature
            graph.validate()
        return graph
    if not args.node_models:
        raise ValueError("no graph given: pass --node-models a,b,... (with --gates or --preset) or --graph FILE")
    if args.gates and args.preset:
        raise ValueError("give either --gates or --preset, not both")
    models = [m.strip() for m in args.node_models.split(",")]
    if any(not m for m in models):
        raise ValueError(f"--node-models {args.node_models!r} has an empty model name")
    checkpoints = None
    if args.checkpoints is not None:
        checkpoints = [c.strip() or None for c in args.checkpoints.split(",")]
        if len(checkpoints) != len(models):
            raise ValueError(f"--checkpoints has {len(checkpoints)} slots but there are {len(models)} nodes "
                             "(use empty slots, e.g. ',teacher.pth')")
    graph = Graph.from_cli(models, gates=args.gates, preset=None if args.gates else (args.preset or "dml"),
                           checkpoints=checkpoints, temperature=args.temperature)
    for node, kwargs in zip(graph.nodes, parse_model_kwargs(args.model_kwargs, len(models))):
        node.model_kwargs.update(kwargs)
    return graph
