#!/usr/bin/env python3
"""Train a Knowledge Transfer Graph.

    accelerate launch train_dcl.py --node-models resnet32,wrn28_2 --dataset cifar10 --data-dir ../shared/data/cifar10
    accelerate launch train_dcl.py --config run.yaml --lr 0.05

Every node is any timm model; gates default to deep mutual learning (--preset dml).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "train_dcl.py"


def build_parser() -> argparse.ArgumentParser:
    from timm_dcl.cli import (HelpFormatter, OneLineArgumentParser, add_config_arg, add_data_args, add_graph_args,
                              add_train_args)
    from timm_dcl.config import RESUME_SCHEDULES, TRACKERS

    parser = OneLineArgumentParser(
        prog=PROG, description="Train a Knowledge Transfer Graph (deep collaborative learning) of timm models.",
        formatter_class=HelpFormatter)
    add_config_arg(parser)
    add_graph_args(parser)
    add_data_args(parser)
    add_train_args(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="DIR",
                   help="run directory (default: output/train/<models>)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR up to --epochs (its graph.json is used when no graph is given)")
    g.add_argument("--resume-schedule", default="replan", choices=RESUME_SCHEDULES,
                   help="when a resume changes --epochs: re-plan the lr schedule and the linear gates over the "
                        "new length, or keep the original plan (extra epochs run at its final lr)")
    g.add_argument("--pretrained-dir", default=None, metavar="DIR",
                   help="graph transfer: take every frozen node's weights from DIR/<dataset>/<model>.pth "
                        "(the layout search_dcl.py uses)")
    g.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                   help="after the run, push node 0 (a folder timm loads, see timm/ in the run) to this Hugging "
                        "Face repository with timm's push_to_hf_hub and a model card (graph, data set, top-1)")
    g.add_argument("--push-nodes", default=None, metavar="N,N",
                   help="with --push-to-hub: the trained nodes to push (default 0); the first goes to ORG/NAME, "
                        "node i after it to ORG/NAME-node<i>")
    g.add_argument("--log-with", default=None, choices=TRACKERS,
                   help="log accuracy, loss and lr per node per epoch through Accelerate's trackers "
                        "(into --output; the tracker's package must be installed)")
    return parser


def _saved_config(run: Path) -> dict:
    """A run's own settings: config.yaml (flag names), else config.json of older runs."""
    import yaml

    from timm_dcl.cli import CliError

    for name, parse in (("config.yaml", yaml.safe_load), ("config.json", json.loads)):
        path = run / name
        if path.is_file():
            try:
                values = parse(path.read_text()) or {}
            except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
                raise CliError(f"--resume {run}: {path} is damaged ({' '.join(str(e).split())[:200]}); repair it "
                               "or delete it and give the run's flags again") from None
            if not isinstance(values, dict):
                raise CliError(f"--resume {run}: {path} is damaged (not a mapping of flags)")
            return values
    return {}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Flags over --config over a resumed run's own settings over the defaults."""
    from timm_dcl.cli import GRAPH_DESTS, apply_config_file

    parser = build_parser()
    early, _ = parser.parse_known_args(argv)
    if early.resume:
        # A resumed run keeps its data, recipe and seed unless a flag overrides them; its graph
        # comes from its graph.json, not from the flags it was started with.
        known = {a.dest for a in parser._actions}
        saved = _saved_config(Path(early.resume))
        parser.set_defaults(**{k: v for k, v in saved.items()
                               if k in known and k not in ("resume", "output", "config", *GRAPH_DESTS)})
    if early.config:
        apply_config_file(parser, early.config)
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> int:
    from timm_dcl.cli import CliError, config_to_yaml, fail, graph_from_args
    from timm_dcl.safe_io import is_write_fault, set_program, write_fault_text

    set_program(PROG)
    try:
        args, parser = parse_args(argv)
    except CliError as e:
        return fail(PROG, e)
    except SystemExit as e:  # --help, or a bad flag (one line already printed): an exit status
        return int(e.code or 0)
    from timm_dcl.config import TrainConfig
    from timm_dcl.data import DatasetUnavailableError
    from timm_dcl.graph import Graph
    from timm_dcl.trainer import train_graph

    # Bad input of any kind (flags, files, data, weights, trackers) is one line and exit 2.
    bad_input = (CliError, ValueError, TypeError, FileNotFoundError, KeyError, DatasetUnavailableError, ImportError)
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
            args.output = str(Path("output") / "train" / "-".join(n.model for n in graph.nodes))
        cfg = TrainConfig.from_args(args, extra={"cli_yaml": config_to_yaml(args, parser)})
        from timm_dcl.hub import check_push_args
        push = check_push_args(args.push_to_hub, args.push_nodes, graph)
    except bad_input as e:
        return fail(PROG, e)
    from timm_dcl.preemption import Preempted
    try:
        train_graph(graph, cfg)
    except Preempted as e:  # a cluster's stop signal: the checkpoint is written, a requeue resumes it
        print(f"{PROG}: {e}", flush=True)
        return 0
    except (*bad_input, FloatingPointError) as e:  # a diverged run says so in one line; last.pth stays
        return fail(PROG, e)
    except OSError as e:  # a full disk, a folder made read-only mid-run: one line, the last checkpoint kept
        if not is_write_fault(e):
            raise
        run = Path(cfg.output or cfg.resume)
        text = write_fault_text(e, run)
        if (run / "checkpoints" / "last.pth").is_file():
            text += f"; the last good checkpoint is kept: continue with --resume {run}"
        return fail(PROG, OSError(text))
    if push:
        return _push(args.push_to_hub, push, Path(cfg.output or cfg.resume))
    return 0


def _push(repo_id: str, nodes: list[int], run: Path) -> int:
    """--push-to-hub, after the run's files are written: a failure (offline, no token) is one line."""
    from accelerate import PartialState

    from timm_dcl.cli import fail
    from timm_dcl.hub import push_nodes

    if not PartialState().is_main_process:
        return 0
    try:
        for repo in push_nodes(run, repo_id, nodes):
            print(f"pushed to https://huggingface.co/{repo}")
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        return fail(PROG, OSError(f"--push-to-hub {repo_id}: cannot push ({reason}); the run is complete and its "
                                  f"files are in {run}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
