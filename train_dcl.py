#!/usr/bin/env python3
"""Train a Knowledge Transfer Graph.

    accelerate launch train_dcl.py --node-models resnet32,wrn28_2 --dataset cifar10 --data-dir ../shared/data/cifar10

Every node is any timm model; gates default to deep mutual learning (--preset dml).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from timm_dcl.config import HelpFormatter, add_data_args, add_graph_args, add_train_args

    parser = argparse.ArgumentParser(
        description="Train a Knowledge Transfer Graph (deep collaborative learning) of timm models.",
        formatter_class=HelpFormatter)
    add_graph_args(parser)
    add_data_args(parser)
    add_train_args(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="DIR",
                   help="run directory (default: output/train/<models>-<preset>)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR up to --epochs (its graph.json is used when no graph is given)")
    g.add_argument("--pretrained-dir", default=None, metavar="DIR",
                   help="graph transfer: take every frozen node's weights from DIR/<dataset>/<model>.pth "
                        "(the layout search_dcl.py uses)")
    return parser


def _resume_defaults(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """A resumed run keeps its own settings (data, recipe, seed) unless a flag overrides them."""
    args, _ = parser.parse_known_args(argv)
    if not args.resume:
        return
    saved = Path(args.resume) / "config.json"
    if saved.is_file():
        known = {a.dest for a in parser._actions}
        values = json.loads(saved.read_text())
        parser.set_defaults(**{k: v for k, v in values.items() if k in known and k not in ("resume", "output")})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _resume_defaults(parser, argv)
    args = parser.parse_args(argv)
    from timm_dcl.config import TrainConfig, graph_from_args
    from timm_dcl.graph import Graph
    from timm_dcl.trainer import train_graph

    try:
        if args.resume and not (args.graph or args.node_models):
            graph_file = Path(args.resume) / "graph.json"
            if not graph_file.is_file():
                raise FileNotFoundError(f"--resume {args.resume}: no graph.json there")
            graph = Graph.load(graph_file)
        else:
            graph = graph_from_args(args)
        if args.pretrained_dir:
            from timm_dcl.pretrained import retarget_pretrained
            graph = retarget_pretrained(graph, args.pretrained_dir, args.dataset)
        if args.output is None and args.resume is None:
            name = "-".join(n.model for n in graph.nodes)
            args.output = str(Path("output") / "train" / name)
        cfg = TrainConfig.from_args(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"train_dcl.py: error: {e}", file=sys.stderr)
        return 2
    try:
        train_graph(graph, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_dcl.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
