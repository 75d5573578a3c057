#!/usr/bin/env python3
"""Search a Knowledge Transfer Graph with ASHA (the paper's graph search, SPEC §6).

    python search_dcl.py --num-nodes 3 --dataset cifar10 --data-dir ../shared/data/cifar10 \\
        --n-trials 1500 --epochs 200 --output output/search/cifar10-3nodes

Every worker attached to the same storage (default: a journal file in --output that local
processes share; or --storage postgresql://... for machines) cooperates on one study until
exactly --n-trials trials have finished; running the command again resumes it.
`accelerate launch --num_processes N search_dcl.py ...` runs N workers, one per GPU. The study
starts with the baselines (independent, DML, KD where --pretrained-dir has a teacher).
--ensemble-target makes node 0 the ensemble of the other nodes; --feature-edges samples the
feature (attention-transfer) gates too.

    python search_dcl.py <the same flags> --report --report-top 3 --report-seeds 3

then retrains the best graphs and the baselines on the whole training split over seeds and
scores node 0 on the test split at the last epoch (OUTPUT/report.md, report.json, report.png).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from timm_dcl.cli import OneLineArgumentParser
    from timm_dcl.config import HelpFormatter, add_data_args, add_train_args

    parser = OneLineArgumentParser(
        prog="search_dcl.py", description="Search the models and gates of a Knowledge Transfer Graph with ASHA (Optuna).",
        formatter_class=HelpFormatter)
    g = parser.add_argument_group("search space")
    g.add_argument("--num-nodes", type=int, default=3, metavar="M", help="nodes of the graph, the target included")
    # None: not given (resnet32 by default, refused with --ensemble-target)
    g.add_argument("--target-model", default=None,
                   help="node 0, the network whose accuracy is optimised (default: resnet32)")
    g.add_argument("--ensemble-target", action="store_true",
                   help="node 0 is the ensemble of nodes 1…M−1 (all drawn from --candidates; M ≥ 2) and the search "
                        "optimises its top-1; its gate row is cutoff, not sampled; no --target-model")
    g.add_argument("--feature-edges", action="store_true",
                   help="sample the feature gates too (attention transfer, fgate_<t>_<s> for s ≠ t); those into "
                        "frozen nodes and into or out of an ensemble are cut")
    g.add_argument("--ema-sources", action="store_true",
                   help="nodes 1…M−1 may also draw ema:0, the EMA of node 0 (a mean teacher; its row is cutoff, "
                        "its decay --model-ema-decay)")
    g.add_argument("--feature-weight", type=float, default=None, metavar="W",
                   help="weight of the feature edges' loss (default: the graph's, 500; needs --feature-edges)")
    g.add_argument("--candidates", default="resnet32,resnet110,wrn28_2", metavar="A,B,...",
                   help="timm models that nodes 1…M−1 choose from")
    g.add_argument("--pretrained-dir", default=None, metavar="DIR",
                   help="pre-trained nodes: DIR/<dataset>/<model>.pth or the one-node run DIR/<dataset>/<model>/ "
                        "of train_dcl.py; a node whose sampled gate row is all cutoff loads them, frozen")
    g.add_argument("--temperature", type=float, default=1.0, help="temperature of the knowledge edges")
    g = parser.add_argument_group("study")
    g.add_argument("--n-trials", type=int, default=1500,
                   help="finished (complete or pruned) trials of the study, over all its workers")
    g.add_argument("--storage", default=None, metavar="URL",
                   help="an Optuna storage URL (postgresql://user:pw@host/db, sqlite:///f.db) or a journal file "
                        "path (default: OUTPUT/study.journal, shared safely by local processes)")
    g.add_argument("--study-name", default=None,
                   help="default: ktg-<dataset>-<M>nodes, plus -ensemble and -features in those modes")
    g.add_argument("--sampler", default="random", choices=("random", "tpe"), help="random: the paper's")
    g.add_argument("--sampler-seed", type=int, default=None,
                   help="seed of the sampler (plus the worker's rank under accelerate launch)")
    g.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the best 1/r at each rung")
    g.add_argument("--min-resource", type=int, default=1, help="ASHA: epochs of the first rung")
    g.add_argument("--heartbeat-interval", type=int, default=60, metavar="SEC",
                   help="a running trial proves its worker alive this often")
    g.add_argument("--grace-period", type=int, default=None, metavar="SEC",
                   help="a running trial silent this long is marked failed (default: 2 × the interval)")
    g.add_argument("--poll-interval", type=float, default=5.0, metavar="SEC",
                   help="how often an idle worker checks whether the last running trials ended")
    g.add_argument("--top-k", type=int, default=3, help="graphs drawn in OUTPUT/top_graphs")
    g.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="do not seed the study (and the report) with the independent, DML and KD graphs")
    g = parser.add_argument_group("final report (--report)")
    g.add_argument("--report", action="store_true",
                   help="instead of searching: retrain the top graphs and the baselines on the whole training "
                        "split over seeds, score node 0 on the test split at the last epoch, and write "
                        "OUTPUT/report.md, report.json, report.png (runs in OUTPUT/report/, resumable)")
    g.add_argument("--report-top", type=int, default=3, metavar="K", help="searched graphs in the report")
    g.add_argument("--report-seeds", type=int, default=3, metavar="N", help="runs per graph in the report")
    g.add_argument("--report-graphs", action="append", default=None, metavar="NAME=FILE[,NAME=FILE]",
                   help="more graphs for the report, each a graph JSON (train_dcl.py --graph's form: models, gates, "
                        "temperature, checkpoints, node lr) trained under the study's recipe over the same seeds "
                        "and listed as NAME (repeatable)")
    g.add_argument("--report-vs", default=None, metavar="NAME[,NAME]",
                   help="the rows every row is compared with, paired by seed (default: every row that is not a "
                        "searched graph; a searched one is named 'searched #RANK')")
    g.add_argument("--output", default=None, metavar="DIR",
                   help="default: output/search/<dataset>-<M>nodes, plus -ensemble and -features in those modes")
    add_data_args(parser)
    add_train_args(parser)
    # the objective is measured on a split held out of the training data
    parser.set_defaults(val_size=5000)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already printed): an exit status, as for every error
        return int(e.code or 0)
    from timm_dcl.safe_io import set_program
    from timm_dcl.search import isolate_worker

    set_program("search_dcl.py")  # the warnings of the journal and of the report's runs say who wrote them
    worker = isolate_worker()  # before anything touches CUDA
    from timm_dcl.preemption import StopSignals

    # SIGTERM/SIGUSR1 (a cluster's preemption) stop the worker at the next training step: its
    # running trial fails at once and is queued again, finished trials are kept, exit 0
    with StopSignals():
        return _search(args, worker)


class _DataError(Exception):
    """The data set could not be loaded: a command-line error, not a crash."""


def _search(args: argparse.Namespace, worker) -> int:
    import optuna

    from timm_dcl.config import TrainConfig
    from timm_dcl.preemption import Preempted
    from timm_dcl.search import (ReportSettings, SearchSpace, SearchWorker, StorageError, enqueue_baselines,
                                 make_pruner, make_sampler, open_storage, open_study, run_report, search_settings,
                                 write_summary)

    def fail(e: BaseException) -> int:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"search_dcl.py: error: {text}", file=sys.stderr)
        return 2

    try:
        if args.n_trials < 1:
            raise ValueError(f"--n-trials must be ≥ 1, got {args.n_trials}")
        if args.top_k < 1:
            raise ValueError(f"--top-k must be ≥ 1, got {args.top_k}")
        if args.poll_interval <= 0:
            raise ValueError(f"--poll-interval must be > 0, got {args.poll_interval}")
        if args.val_size < 1:
            raise ValueError("the search scores node 0 on a validation split held out of the training data: "
                             "--val-size must be ≥ 1")
        if not args.report and (args.report_graphs or args.report_vs):
            raise ValueError("--report-graphs and --report-vs shape the final report: they need --report")
        report = ReportSettings(args.report_top, args.report_seeds, args.poll_interval,
                                graphs=_named_files(args.report_graphs or []),
                                vs=None if args.report_vs is None else tuple(
                                    v.strip() for v in args.report_vs.split(",") if v.strip())
                                ) if args.report else None
        candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
        if args.feature_weight is not None and not args.feature_edges:
            raise ValueError("--feature-weight weighs the feature edges: it needs --feature-edges")
        space = SearchSpace(args.num_nodes, args.target_model, tuple(candidates), args.dataset,
                            args.pretrained_dir, args.temperature, ensemble_target=args.ensemble_target,
                            feature_edges=args.feature_edges, ema_sources=args.ema_sources,
                            **({} if args.feature_weight is None else {"feature_weight": args.feature_weight}))
        # the modes get their own default study: one study never mixes them (its settings refuse it)
        mode = (("-ensemble" if args.ensemble_target else "") + ("-features" if args.feature_edges else "")
                + ("-ema" if args.ema_sources else ""))
        output = Path(args.output or Path("output") / "search" / f"{args.dataset}-{args.num_nodes}nodes{mode}")
        cfg = TrainConfig.from_args(args, output=None, eval_split="val")
        pruner = make_pruner(args.min_resource, args.reduction_factor)
        seed = None if args.sampler_seed is None else args.sampler_seed + worker.rank
        sampler = make_sampler(args.sampler, seed)
        study_name = args.study_name or f"ktg-{args.dataset}-{args.num_nodes}nodes{mode}"
        storage = open_storage(args.storage, output / "study.journal", heartbeat_interval=args.heartbeat_interval,
                               grace_period=args.grace_period)
        # A report of baselines and extra graphs alone (--report-top 0) reads no trial: it may come
        # before the search (a pilot), and then opens the study the search will use.
        if report is not None and report.top > 0 and study_name not in optuna.study.get_all_study_names(storage):
            raise ValueError(f"--report: the storage holds no study {study_name!r}; run the search first "
                             "(or give its --storage and --study-name)")
        study = open_study(storage, study_name,
                           search_settings(space, cfg, min_resource=args.min_resource,
                                           reduction_factor=args.reduction_factor),
                           sampler=sampler, pruner=pruner)
        if report is None and args.baselines:
            enqueue_baselines(study, space)
    except (ValueError, TypeError, StorageError, FileNotFoundError) as e:
        return fail(e)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial, under the bar
    log_file = output / "logs" / f"{worker.name.replace(':', '-')}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    def say(message: str) -> None:
        with open(log_file, "a") as f:
            f.write(message + "\n")
        if worker.is_main:
            tqdm.write(message, file=sys.stdout)

    def load_data(val_size: int):
        from timm_dcl.trainer import build_run_data

        try:
            return build_run_data(cfg, space.input_model, val_size=val_size)
        except (ValueError, FileNotFoundError, OSError, RuntimeError, KeyError) as e:  # DatasetUnavailableError…
            raise _DataError(f"--dataset {cfg.dataset}: {e}") from None

    if report is not None:
        try:
            result = run_report(study, space, cfg, output, report, load_data=lambda: load_data(0),
                                baselines=args.baselines, say=say, write=worker.is_main)
        except (_DataError, ValueError, FileNotFoundError) as e:
            return fail(e)
        except OSError as e:  # a full disk or a read-only folder under a report run: one line
            from timm_dcl.safe_io import is_write_fault, write_fault_text
            if not is_write_fault(e):
                raise
            return fail(OSError(write_fault_text(e, output / "report") + "; run the same command again once "
                                "there is room: finished runs are kept"))
        except KeyboardInterrupt:
            say(f"worker {worker.name}: interrupted; run the same command again to finish the report")
            return 130
        except Preempted as e:  # the report's run wrote its last.pth: the same command resumes it
            say(f"search_dcl.py: worker {worker.name}: {e}; run the same command again to finish the report")
            return 0
        if worker.is_main:
            print(f"report: trained {result['trained']} run(s) here; " + (
                "every run was already done" if not result["trained"] else "the rest were done"))
            print((output / "report.md").read_text())
            print(f"outputs in {output}: report.md, report.json, report.png, report/ (the runs)")
        return 0

    bar = tqdm(total=args.n_trials, desc=f"search {study_name}", unit="trial", dynamic_ncols=True,
               disable=not (cfg.progress_bar and worker.is_main))

    def progress(finished: int, total: int) -> None:
        if bar.n != finished:
            bar.n = finished
            bar.refresh()

    settings = ", ".join(f"{k}={v}" for k, v in (
        ("num_nodes", args.num_nodes), ("target_model", space.target_model), ("candidates", args.candidates),
        ("feature_edges", args.feature_edges), ("epochs", args.epochs), ("sampler", args.sampler),
        ("reduction_factor", args.reduction_factor), ("min_resource", args.min_resource)))
    say(f"worker {worker.name}: study {study_name!r} ({settings}), {args.n_trials} trials in total")
    try:
        data = load_data(cfg.val_size)
    except _DataError as e:
        bar.close()
        return fail(e)

    start = time.perf_counter()
    code = 0
    try:
        run = SearchWorker(study, storage, space, cfg, data, n_trials=args.n_trials,
                           poll_interval=args.poll_interval, worker=worker, log_file=log_file, say=say,
                           progress=progress)
        ran = run.run()
        say(f"worker {worker.name}: ran {ran} trial(s) in {time.perf_counter() - start:.0f}s; the study is done")
    except KeyboardInterrupt:
        say(f"worker {worker.name}: interrupted; its running trial is marked failed. "
            "Run the same command again to resume the study.")
        code = 130
    except Preempted as e:
        say(f"search_dcl.py: worker {worker.name}: {e}; a running trial is failed and its graph queued again, "
            "finished trials are kept: run the same command again to resume the study")
    finally:
        bar.close()
    if worker.is_main:
        summary = write_summary(study, space, output, min_resource=args.min_resource,
                                reduction_factor=args.reduction_factor, epochs=cfg.epochs, n_trials=args.n_trials,
                                top_k=args.top_k)
        print(summary)
        print(f"outputs in {output}: best_graph.json, trials.csv, asha.png, top_graphs/, search_summary.json")
    return code


def _named_files(values: list[str]) -> tuple[tuple[str, str], ...]:
    """``NAME=FILE[,NAME=FILE]`` flags as ``((name, file), ...)``."""
    out = []
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"--report-graphs takes NAME=FILE, got {item!r}")
            out.append((name.strip(), path.strip()))
    return tuple(out)


if __name__ == "__main__":
    sys.exit(main())
