"""Command-line flags shared by train_dcl.py and search_dcl.py, and what turns them into a graph.

Flags follow timm's ``train.py`` (kebab-case: ``--epochs``, ``--lr``, ``--opt``, ``--sched``,
``--output``, ``--resume``, ``--config``); defaults are the paper's recipe (SPEC §4). A YAML
file given with ``--config`` supplies defaults under the flags' names with underscores, and
the command line overrides it, as in timm's ``train.py``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = [
    "HelpFormatter", "add_data_args", "add_train_args", "add_graph_args", "add_config_arg",
    "graph_from_args", "parse_model_kwargs", "parse_node_values", "split_top_level",
    "apply_config_file", "config_to_yaml", "GRAPH_DESTS", "CliError", "fail",
]

# Flags that describe the graph: on resume the run's graph.json is the truth for these.
GRAPH_DESTS = ("node_models", "gates", "preset", "checkpoints", "temperature", "model_kwargs", "graph",
               "pretrained", "pretrained_file", "node_lr", "node_opt", "node_weight_decay",
               "feature_gates", "feature_stage", "feature_weight")


class OneLineArgumentParser(argparse.ArgumentParser):
    """A bad flag is one line (``prog: error: …``, exit 2), like every other error of the scripts:
    argparse would print the whole usage first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class CliError(ValueError):
    """Bad command-line input: printed as one line ``prog: error: ...`` with exit status 2."""


def fail(prog: str, error: BaseException) -> int:
    """Print ``error`` as the one line a CLI error is, and return the exit status 2."""
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it, or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _yes_no_auto(text: str) -> Optional[bool]:
    value = {"yes": True, "true": True, "no": False, "false": False, "auto": None}.get(str(text).lower(), "bad")
    if value == "bad":
        raise argparse.ArgumentTypeError(f"expected yes, no or auto, got {text!r}")
    return value


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, metavar="FILE.yaml",
                        help="YAML file of defaults: keys are the flags' names with underscores "
                             "(node_models, data_dir, lr, ...); flags on the command line override them")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", metavar="NAME",
                   help="cifar10 | cifar100 | tiny-imagenet (hub copy, or --data-dir in its parquet layout); "
                        "folder (an image folder, --data-dir DIR/train/<class>/...); parquet (any folder of "
                        "Hugging Face parquet split files); hfds/<hub id> (any hub image-classification "
                        "data set) (default: cifar100)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="offline copy in the hub's parquet layout (train.parquet, test.parquet), or the folder "
                        "of --dataset folder|parquet")
    g.add_argument("--train-split", default=None, metavar="NAME",
                   help="training split (folder: subfolder; default train)")
    g.add_argument("--val-split", default=None, metavar="NAME",
                   help="evaluation split (default: the first of val, validation, test, valid that exists)")
    g.add_argument("--image-column", default=None, metavar="COL",
                   help="parquet/hub: the image column (default: found from the schema's Image feature)")
    g.add_argument("--label-column", default=None, metavar="COL",
                   help="parquet/hub: the label column (default: the schema's ClassLabel or integer column)")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a fixed, seeded, class-balanced subset of N images")
    g.add_argument("--eval-subset", type=int, default=None, metavar="N",
                   help="evaluate on a fixed, class-balanced subset of N test images")
    g.add_argument("--val-size", type=int, default=0, metavar="N",
                   help="hold out N training images as a validation split")
    g.add_argument("--in-memory", type=_yes_no_auto, default=None, metavar="yes|no|auto",
                   help="decode each split once into memory (fast, batched augmentation on the device) or "
                        "stream it through DataLoader workers with timm's transforms (default: auto, in "
                        "memory when the decoded split fits the memory budget)")
    g.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="input image size (default: the data's own, 32 for CIFAR and 64 for Tiny-ImageNet, "
                        "or node 0's pretrained_cfg for folder and hub data)")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input size as timm's train.py takes it (C must be 3)")
    g.add_argument("--crop-pct", type=float, default=None, metavar="PCT",
                   help="evaluation centre-crop fraction (default: node 0's pretrained_cfg)")
    g.add_argument("--workers", "-j", type=int, default=4, metavar="N",
                   help="processes that decode the images (in memory: once, cached; streaming: every epoch)")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training (defaults: the paper's recipe)")
    from .config import FROZEN_BN, RECIPES
    g.add_argument("--recipe", default="timm-dcl", choices=RECIPES,
                   help="timm-dcl: the project's defaults; paper: the authors' released code where it differs "
                        "(SPEC §8): inputs in [0, 1] without mean/std, plain He init of the CIFAR networks (no "
                        "zero-initialised last BN), lr x0.1 once the 1-based epoch reaches 30/60/90%% of --epochs "
                        "(60, 120, 180 of 200), batch 64 with the last partial batch dropped, linear gates over "
                        "K = (floor(N/B)+1)*epochs; flags given explicitly (--batch-size, --decay-milestones, "
                        "--drop-last/--no-drop-last, --frozen-bn, also as --config keys) override it")
    g.add_argument("--epochs", type=int, default=200, help="training epochs")
    g.add_argument("--batch-size", "-b", type=int, default=64, help="per process")
    g.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=None,
                   help="drop each epoch's last partial batch (default: the recipe's, on for --recipe paper)")
    from .config import ENSEMBLE_MEANS
    g.add_argument("--ensemble-mean", default="logits", choices=ENSEMBLE_MEANS,
                   help="how an ensemble node combines its members: the mean of their logits (as the authors' "
                        "code) or probs, the log of the mean of their softmaxes")
    g.add_argument("--frozen-bn", default="eval", choices=FROZEN_BN,
                   help="frozen nodes' BatchNorm while training: eval (running statistics, SPEC §3) or train "
                        "(batch statistics, the running ones drift, as in the authors' code)")
    g.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="evaluate every N-th epoch and always the last (the others are recorded with top1 null); "
                        "on CPU a full test split every epoch can cost as much as the training")
    g.add_argument("--edge-stats-every", type=int, default=10, metavar="N",
                   help="edge diagnostics (edge loss, correct-gate kept fraction, gate weight per edge, in "
                        "metrics.jsonl and edges.png) from every N-th training batch; 0: none")
    g.add_argument("--opt", default="sgd", metavar="NAME",
                   help="optimiser, any name timm's create_optimizer_v2 knows (sgd is SGD with Nesterov "
                        "momentum; adamw, lamb, ...)")
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate of every node (see --node-lr)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay")
    g.add_argument("--opt-filter-bias-bn", action="store_true",
                   help="no weight decay on biases and normalisation layers, as timm's train.py (the paper "
                        "decays every parameter)")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradients (per node)")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"), help="gradient clipping mode")
    from .config import SCHEDULERS
    g.add_argument("--sched", default="multistep", choices=SCHEDULERS,
                   help="learning-rate schedule, through timm's create_scheduler_v2")
    g.add_argument("--sched-on-updates", action="store_true", help="step the schedule every iteration, not every epoch")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=None, metavar="EPOCH",
                   help="multistep decay epochs, 0-based: the first epoch at the decayed lr (default: "
                        "round(30/60/90%% of --epochs), 60 120 180 of 200; --recipe paper: one less, 59 119 179, "
                        "i.e. the 1-based epochs 60, 120, 180 run decayed)")
    g.add_argument("--decay-epochs", type=float, default=None, metavar="N",
                   help="step: decay every N epochs (default: 30%% of --epochs)")
    g.add_argument("--decay-rate", type=float, default=0.1, help="multistep/step factor")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up epochs from --warmup-lr")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate the warm-up starts at")
    g.add_argument("--min-lr", type=float, default=0.0, help="lower bound of cosine, tanh and poly schedules")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, subsets, order and augmentation")
    from .config import MIXED_PRECISION
    g.add_argument("--mixed-precision", default=None, choices=MIXED_PRECISION,
                   help="overrides the accelerate config")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on for CPU and mixed precision)")
    g.add_argument("--compile", action="store_true", help="torch.compile every node")
    g.add_argument("--no-progress", dest="progress_bar", action="store_false", help="no tqdm bars")
    # issue 18: timm's train.py names and meanings (timm.utils.ModelEmaV3)
    g.add_argument("--model-ema", action="store_true",
                   help="keep an EMA of every trainable node's weights (timm's ModelEmaV3): metrics gain "
                        "top1_ema, node files the EMA weights (an ema:N node keeps node N's in any case)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, metavar="D",
                   help="EMA decay, in [0, 1)")
    g.add_argument("--model-ema-warmup", action="store_true",
                   help="warm the EMA decay up over the first updates (timm's use_warmup)")
    g.add_argument("--checkpoint-every-steps", type=int, default=None, metavar="N",
                   help="also write checkpoints/last.pth every N training steps, mid-epoch (a --resume "
                        "continues the epoch where it stopped); SIGTERM or SIGUSR1 always write it at the "
                        "next step and stop the run")
    from .timm_recipe import add_timm_recipe_args
    add_timm_recipe_args(parser)


def add_graph_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("graph")
    g.add_argument("--node-models", default=None, metavar="A,B,...",
                   help="comma-separated timm model names, node 0 (the target) first; 'ensemble' is a "
                        "virtual node, the mean of every other network's logits ('ensemble:1+2': of nodes 1 "
                        "and 2), that only teaches (its gate row is cutoff); 'ema:N' is another, the logits of "
                        "node N's EMA (a mean teacher; see --model-ema-decay)")
    g.add_argument("--gates", default=None, metavar="ROWS",
                   help='gate matrix, rows split by ";": row t lists the gates of the edges into '
                        'node t, sources in node order, e.g. "through,cutoff;correct,through"')
    g.add_argument("--preset", default=None, choices=("dml", "kd", "independent"),
                   help="a classic graph instead of --gates (default: dml)")
    g.add_argument("--checkpoints", default=None, metavar="P,,Q",
                   help="comma-separated checkpoint per node (empty slot: none); a node with a checkpoint and "
                        "an all-cutoff row is frozen, any other node starts from it (a warm start)")
    g.add_argument("--pretrained", nargs="?", const="all", default=None, metavar="N,N",
                   help="start nodes from timm's pretrained weights for their model name and tag "
                        "(resnet50.a1_in1k), the classifier re-initialised for the data's classes; "
                        "alone: every node, or a comma-separated list of node indices")
    g.add_argument("--pretrained-file", action="append", default=[], metavar="N:PATH",
                   help="node N starts from a local timm weight file (safetensors or a state_dict .pth); "
                        "repeatable")
    g.add_argument("--node-lr", action="append", default=[], metavar="N:LR", help="node N's learning rate")
    g.add_argument("--node-opt", action="append", default=[], metavar="N:NAME", help="node N's optimiser")
    g.add_argument("--node-weight-decay", action="append", default=[], metavar="N:WD", help="node N's weight decay")
    g.add_argument("--temperature", type=float, default=None,
                   help="temperature of the knowledge edges (default 1; kd: 2)")
    g.add_argument("--feature-gates", default=None, metavar="ROWS",
                   help="feature edges, in the syntax of --gates (the diagonal cutoff): attention transfer "
                        "from the source's to the learner's output of stage --feature-stage")
    g.add_argument("--feature-stage", type=int, default=None, metavar="N",
                   help="the stage feature edges read: an index of timm's forward_intermediates, negative "
                        "from the end (default: -1, the last stage)")
    g.add_argument("--feature-weight", type=float, default=None, metavar="W",
                   help="weight of every feature edge's loss (default: 500, attention transfer's β/2 "
                        "with β = 1000)")
    g.add_argument("--model-kwargs", action="append", default=[], metavar="N:KEY=VALUE,...",
                   help="keyword arguments of node N's model as Python literals, e.g. "
                        "1:img_size=(32,32),patch_size=4 (repeatable; 'all:' applies to every node)")
    g.add_argument("--graph", default=None, metavar="FILE", help="a graph JSON file (e.g. best_graph.json)")


# ------------------------------------------------------------------------------ parsing


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and quotes: ``"a=(1,2),b='x,y'"`` → two items."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string, as timm's train.py reads model kwargs


def _node_targets(flag: str, item: str, where: str, num_nodes: int, allow_all: bool) -> range | list[int]:
    if allow_all and where == "all":
        return range(num_nodes)
    try:
        index = int(where)
    except ValueError:
        raise CliError(f"{flag} {item!r}: {where!r} is not a node index") from None
    if not 0 <= index < num_nodes:
        raise CliError(f"{flag} {item!r}: node {where} does not exist (graph has {num_nodes} nodes)")
    return [index]


def parse_model_kwargs(items: list[str], num_nodes: int) -> list[dict[str, Any]]:
    """``["1:img_size=(32,32),patch_size=4", "all:drop_rate=0.1"]`` → one kwargs dict per node."""
    per_node: list[dict[str, Any]] = [{} for _ in range(num_nodes)]
    for item in items:
        where, sep, body = item.partition(":")
        if not sep:
            raise CliError(f"--model-kwargs {item!r}: expected N:KEY=VALUE[,KEY=VALUE] or all:KEY=VALUE")
        targets = _node_targets("--model-kwargs", item, where.strip(), num_nodes, allow_all=True)
        for pair in filter(None, (p.strip() for p in split_top_level(body))):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip().isidentifier():
                raise CliError(f"--model-kwargs {item!r}: {pair!r} is not KEY=VALUE")
            for t in targets:
                per_node[t][key.strip()] = _literal(value.strip())
    return per_node


def parse_node_values(flag: str, items: list[str], num_nodes: int,
                      convert: Callable[[str], Any]) -> dict[int, Any]:
    """``--node-lr 1:0.01`` (repeatable, or ``0:0.1,1:0.01``) → ``{1: 0.01}``."""
    out: dict[int, Any] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            where, sep, value = part.partition(":")
            if not sep or not value.strip():
                raise CliError(f"{flag} {part!r}: expected N:VALUE")
            for t in _node_targets(flag, part, where.strip(), num_nodes, allow_all=True):
                try:
                    out[t] = convert(value.strip())
                except ValueError:
                    raise CliError(f"{flag} {part!r}: {value.strip()!r} is not a valid value") from None
    return out


def _pretrained_nodes(value: Optional[str], num_nodes: int) -> set[int]:
    if value is None:
        return set()
    if value.strip() == "all":
        return set(range(num_nodes))
    nodes = set()
    for part in filter(None, (p.strip() for p in value.split(","))):
        nodes.update(_node_targets("--pretrained", value, part, num_nodes, allow_all=False))
    return nodes


def _pretrained_files(items: list[str], num_nodes: int) -> dict[int, str]:
    out = {}
    for item in items:
        where, sep, path = item.partition(":")
        if not sep or not path.strip():
            raise CliError(f"--pretrained-file {item!r}: expected N:PATH")
        (t,) = _node_targets("--pretrained-file", item, where.strip(), num_nodes, allow_all=False)
        if not Path(path).is_file():
            raise CliError(f"--pretrained-file {item!r}: no file at {path}")
        out[t] = path
    return out


def _cli_node(text: str, checkpoint: Optional[str], num_nodes: int):
    """A --node-models entry: a timm model name, ``ensemble``, ``ensemble:1+2`` or ``ema:N``."""
    from .graph import EMA, ENSEMBLE, Node

    name, sep, rest = text.partition(":")
    if name.strip() == EMA:
        if checkpoint is not None:
            raise CliError(f"--checkpoints: {text!r} is an EMA node, which has no weights of its own")
        try:
            return Node(EMA, of=int(rest))
        except ValueError:
            raise CliError(f"--node-models {text!r}: expected ema:N, N the index of the node whose EMA it is, "
                           "e.g. ema:0") from None
    if name.strip() != ENSEMBLE:
        return Node(text, checkpoint=checkpoint)
    if checkpoint is not None:
        raise CliError(f"--checkpoints: {text!r} is an ensemble node, which has no weights")
    if not sep:
        return Node(ENSEMBLE)
    try:
        members = [int(v) for v in rest.split("+")]
    except ValueError:
        raise CliError(f"--node-models {text!r}: expected ensemble:N+N+... with node indices, "
                       f"e.g. ensemble:1+2") from None
    return Node(ENSEMBLE, members=members)


def graph_from_args(args: argparse.Namespace):
    """The graph a command line describes: --graph FILE, or --node-models with gates/preset,
    with the per-node flags (weights, model kwargs, recipe overrides) applied on top."""
    from .graph import Graph

    if args.graph:
        if args.node_models or args.gates or args.preset:
            raise CliError("give either --graph FILE or --node-models/--gates/--preset, not both")
        base = Graph.load(args.graph)
        nodes, m = base.nodes, base.num_nodes
    else:
        if not args.node_models:
            raise CliError("no graph given: pass --node-models a,b,... (with --gates or --preset) or --graph FILE")
        if args.gates and args.preset:
            raise CliError("give either --gates or --preset, not both")
        models = [x.strip() for x in args.node_models.split(",")]
        if any(not x for x in models):
            raise CliError(f"--node-models {args.node_models!r} has an empty model name")
        m = len(models)
        checkpoints = [None] * m
        if args.checkpoints is not None:
            checkpoints = [c.strip() or None for c in args.checkpoints.split(",")]
            if len(checkpoints) != m:
                raise CliError(f"--checkpoints has {len(checkpoints)} slots but there are {m} nodes "
                               "(use empty slots, e.g. ',teacher.pth')")
        nodes = [_cli_node(x, c, m) for x, c in zip(models, checkpoints)]

    for node, kwargs in zip(nodes, parse_model_kwargs(getattr(args, "model_kwargs", []) or [], m)):
        node.model_kwargs.update(kwargs)
    for t in _pretrained_nodes(getattr(args, "pretrained", None), m):
        nodes[t].pretrained = True
    for t, path in _pretrained_files(getattr(args, "pretrained_file", []) or [], m).items():
        nodes[t].pretrained_file = path
    for flag, dest, convert in (("--node-lr", "node_lr", float), ("--node-opt", "node_opt", str),
                                ("--node-weight-decay", "node_weight_decay", float)):
        for t, value in parse_node_values(flag, getattr(args, dest, []) or [], m, convert).items():
            setattr(nodes[t], dest.removeprefix("node_"), value)

    if args.graph:
        if args.temperature is not None:
            base.temperature = args.temperature
        base.nodes = nodes
        graph = base.validate()
    else:
        graph = Graph.from_cli([n.model for n in nodes], gates=args.gates,
                               preset=None if args.gates else (args.preset or "dml"),
                               temperature=args.temperature, nodes=nodes)
    return _with_feature_flags(graph, args)


def _with_feature_flags(graph, args: argparse.Namespace):
    """``graph`` with --feature-gates/--feature-stage/--feature-weight applied (over a --graph file's)."""
    from .gates import parse_gates

    rows = getattr(args, "feature_gates", None)
    stage, weight = getattr(args, "feature_stage", None), getattr(args, "feature_weight", None)
    if rows is None and stage is None and weight is None:
        return graph
    if rows is None and not graph.has_feature_edges:
        flag = "--feature-stage" if stage is not None else "--feature-weight"
        raise CliError(f"{flag} without feature edges does nothing: give --feature-gates ROWS too")
    changes = {}
    if rows is not None:
        try:
            changes["feature_gates"] = parse_gates(rows, graph.num_nodes)
        except (TypeError, ValueError) as e:
            raise CliError(f"--feature-gates: {e}") from None
    if stage is not None:
        changes["feature_stage"] = stage
    if weight is not None:
        changes["feature_weight"] = weight
    try:
        return dataclasses.replace(graph, **changes)
    except (TypeError, ValueError) as e:
        flag = next((f"--{key.replace('_', '-')}: " for key in changes if str(e).startswith(key)), "")
        raise CliError(f"{flag}{e}") from None


# ------------------------------------------------------------------------------ YAML config


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def apply_config_file(parser: argparse.ArgumentParser, path: str, *, skip: tuple[str, ...] = ()) -> None:
    """Make the values of the YAML file at ``path`` the parser's defaults (flags still override).

    Keys are the flags' destinations (``node_models``, ``data_dir``, ...); an unknown key is an
    error naming it, as a mistyped flag would be.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise CliError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise CliError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise CliError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = [k for k in values if str(k).replace("-", "_") not in known]
    if unknown:
        raise CliError(f"--config {path}: unknown key {unknown[0]!r} (keys are the flags' names with "
                       "underscores, e.g. node_models, data_dir, lr)")
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest in skip:
            continue
        action = known[dest]
        # Values typed by hand arrive as YAML types; give them the flag's own conversion so
        # `lr: 1e-3` (a string to YAML) and `lr: 0.001` mean the same.
        if value is not None and action.type is not None and not isinstance(value, (list, bool)):
            try:
                value = action.type(value if isinstance(value, str) else str(value))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise CliError(f"--config {path}: {key}: {e}") from None
        if value is not None and action.choices is not None and value not in action.choices:
            raise CliError(f"--config {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        if isinstance(action, argparse._AppendAction) and value is not None and not isinstance(value, list):
            value = [value]
        defaults[dest] = value
    parser.set_defaults(**defaults)


def config_to_yaml(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The resolved configuration of a run as YAML that ``--config`` reads back."""
    import yaml

    known = [a.dest for a in parser._actions if a.dest not in ("help", "config", "resume")]
    values = {dest: getattr(args, dest) for dest in known if hasattr(args, dest)}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    header = "# timm-dcl run configuration: reproduce with --config this_file (and a new --output)\n"
    return header + yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
