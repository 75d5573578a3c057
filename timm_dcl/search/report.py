"""The final report: the best searched graphs against the baselines, over seeds, on the test split.

The search ranks graphs by one noisy validation score. The report retrains the top ``K``
distinct graphs by that score and the study's baselines on the whole training split (the
validation images go back to training), ``N`` seeds each, and scores node 0 on the test split
at the last epoch: the test set selects nothing, not even an epoch.

Every run is an ordinary train_dcl.py run directory, ``OUTPUT/report/<graph id>/seed<k>``,
so it resumes from ``checkpoints/last.pth`` and a finished one is read, never retrained.
Workers (processes, or machines sharing the folder) split the runs between them: a worker
trains a run only while it holds the run's lock file, an ``fcntl.flock`` that the kernel
releases when its process dies, so a killed worker's run is resumed by the next one. (Optuna
locks only its own trials; the report's runs live outside the study.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import optuna

from ..config import RECIPE_FIELDS
from .plots import plot_report
from .space import CanonicalGraph, SearchSpace
from .summary import atomic_write_text, top_trials

__all__ = ["ReportSettings", "ReportGraph", "report_graphs", "run_report"]

#: Settings of a finished run that must match the report's, or its result is not comparable.
RECIPE_KEYS = ("dataset", "eval_subset", "eval_split") + RECIPE_FIELDS


@dataclass(frozen=True)
class ReportSettings:
    top: int = 3  # searched graphs, best validation score first
    seeds: int = 3  # runs per graph
    poll_interval: float = 5.0  # how often a worker checks the runs other workers hold

    def __post_init__(self) -> None:
        for name, low in (("top", 0), ("seeds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--report-{name} must be an integer ≥ {low}, got {value!r}")


@dataclass
class ReportGraph:
    role: str  # "searched" or the baseline's name
    canon: CanonicalGraph
    rank: Optional[int] = None  # its rank among the searched graphs
    trial: Optional[int] = None
    val_top1: Optional[float] = None  # the search's score (validation split)


def report_graphs(study: optuna.Study, space: SearchSpace, top: int, *, baselines: bool = True) -> list[ReportGraph]:
    """The baselines, then the top ``top`` searched graphs; a searched graph equal to a baseline is
    listed once, as the baseline, with its rank."""
    rows: list[ReportGraph] = []
    by_key: dict[str, ReportGraph] = {}
    if baselines:
        for b in space.baselines():
            row = ReportGraph(b.name, space.canonical(b.params))
            rows.append(row)
            by_key[row.canon.key] = row
    for rank, t in enumerate(top_trials(study, space, top) if top else [], 1):
        canon = space.canonical(t.params)
        value = t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)]
        row = by_key.get(canon.key)
        if row is None:
            row = ReportGraph("searched", canon)
            rows.append(row)
            by_key[canon.key] = row
        row.rank, row.trial, row.val_top1 = rank, t.number, float(value)
    return rows


def _run_dir(output: Path, g: ReportGraph, seed_index: int) -> Path:
    return output / "report" / g.canon.id / f"seed{seed_index}"


def _diverged_marker(run: Path) -> Path:
    return run.with_name(f"{run.name}.diverged")


def _read_result(run: Path, cfg, epochs: int) -> Optional[dict]:
    """The run's record of the last epoch, None if it has not got there; refuses other settings.

    A run whose loss diverged is a result too (``{"diverged": reason}``): retraining it would
    diverge again, and hiding it would flatter the graph.
    """
    if _diverged_marker(run).is_file():
        return {"diverged": _diverged_marker(run).read_text().strip()}
    config = run / "config.json"
    if not config.is_file():
        return None
    saved = json.loads(config.read_text())
    ours = cfg.to_dict()
    diff = [k for k in RECIPE_KEYS if k in saved and saved.get(k) != ours.get(k)]
    if diff:
        raise ValueError(f"{run} was trained with other settings ({', '.join(f'{k}: {saved[k]!r}, now {ours[k]!r}' for k in diff)}); "
                         "give the report the search's settings, or another --output")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    for line in metrics.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if int(record["epoch"]) == epochs:
                return record
    return None


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Hold ``path``'s exclusive flock if no other process holds it; yields whether we do."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_report(study: optuna.Study, space: SearchSpace, cfg, output: str | os.PathLike, settings: ReportSettings, *,
               load_data: Callable[[], Any], baselines: bool = True, say: Callable[[str], None] = print,
               write: bool = True) -> dict:
    """Train what is missing of the report's runs, then write report.md, report.json and report.png.

    ``cfg`` is the search's recipe; the runs train on the whole training split (``val_size=0``)
    and evaluate on the test split. ``load_data()`` is called only if a run needs training, so a
    report whose runs are all done loads no data. Returns the report (``rows``, ``trained``).
    """
    from ..trainer import train_graph

    out = Path(output)
    graphs = report_graphs(study, space, settings.top, baselines=baselines)
    if not graphs:
        raise ValueError(f"study {study.study_name!r} has no finished trial and --no-baselines is set: "
                         "nothing to report")
    run_cfg = dataclasses.replace(cfg, val_size=0, eval_split="test", output=None, resume=None, progress_bar=False)
    runs = [(g, k) for g in graphs for k in range(settings.seeds)]
    data, trained = None, 0
    while True:
        held_elsewhere = 0
        for g, k in runs:
            run = _run_dir(out, g, k)
            seed_cfg = dataclasses.replace(run_cfg, seed=cfg.seed + k, output=str(run))
            if _read_result(run, seed_cfg, cfg.epochs) is not None:
                continue
            with _try_lock(run.with_name(f"seed{k}.lock")) as mine:
                if not mine:
                    held_elsewhere += 1
                    continue
                if _read_result(run, seed_cfg, cfg.epochs) is not None:  # finished while we looked
                    continue
                if data is None:
                    data = load_data()
                resume = (run / "checkpoints" / "last.pth").is_file()
                graph = space.build_canonical(g.canon)
                features = f" features [{g.canon.feature_gates_text}]" if g.canon.feature_gates else ""
                say(f"report: {'resuming' if resume else 'training'} {g.role} {g.canon.models_text} "
                    f"[{g.canon.gates_text}]{features} seed {k} → {run}")
                start = time.perf_counter()
                try:
                    with open(run.with_name(f"seed{k}.log"), "a", buffering=1) as log, \
                            contextlib.redirect_stdout(log):
                        train_graph(graph, dataclasses.replace(seed_cfg, resume=str(run) if resume else None),
                                    data=data)
                except FloatingPointError as e:
                    atomic_write_text(_diverged_marker(run), f"{e}\n")
                    say(f"report: {g.canon.id}/seed{k} diverged: {e}")
                trained += 1
                say(f"report: {g.canon.id}/seed{k} done in {time.perf_counter() - start:.0f}s")
        if not held_elsewhere:
            break
        say(f"report: waiting for {held_elsewhere} run(s) that other workers are training")
        time.sleep(settings.poll_interval)

    rows = []
    for g in graphs:
        records = [_read_result(_run_dir(out, g, k), dataclasses.replace(run_cfg, seed=cfg.seed + k,
                                                                         output=str(_run_dir(out, g, k))), cfg.epochs)
                   for k in range(settings.seeds)]
        # a diverged seed is null in the lists and left out of mean, std and n (``diverged`` counts it)
        top1 = [None if "diverged" in r else float(r["top1"][0]) for r in records]
        ens = [None if "diverged" in r else float(r["ensemble_top1"]) for r in records]
        finished = [v for v in top1 if v is not None]
        mean, std = _mean_std(finished)
        ens_mean, ens_std = _mean_std([v for v in ens if v is not None])
        rows.append({"role": g.role, "rank": g.rank, "trial": g.trial, "val_top1": g.val_top1,
                     "models": g.canon.models_text, "gates": g.canon.gates_text,
                     # only with an open feature edge: a logit-only study's report.json is as before
                     **({"feature_gates": g.canon.feature_gates_text} if g.canon.feature_gates else {}),
                     "graph_id": g.canon.id,
                     "seeds": [cfg.seed + k for k in range(settings.seeds)], "top1": top1, "mean": mean, "std": std,
                     "n": len(finished), "diverged": len(top1) - len(finished),
                     "ensemble_top1": ens, "ensemble_mean": ens_mean, "ensemble_std": ens_std,
                     "runs": [str(_run_dir(out, g, k).relative_to(out)) for k in range(settings.seeds)]})
    report = {"study": study.study_name, "epochs": cfg.epochs, "split": "test", "epoch": "last",
              "seeds": settings.seeds, "top": settings.top, "trained": trained, "rows": rows}
    if write:
        atomic_write_text(out / "report.json", json.dumps(rows, indent=2) + "\n")
        atomic_write_text(out / "report.md", _markdown(report, space, cfg))
        plot_report(rows, out / "report.png",
                    title=f"{study.study_name}: node 0 ({space.target_model}) on the test split, last epoch "
                          f"({cfg.epochs}), {settings.seeds} seed(s)")
    return report


def _fmt(mean: Optional[float], std: Optional[float]) -> str:
    return "-" if mean is None or math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _markdown(report: dict, space: SearchSpace, cfg) -> str:
    subset = f"a {cfg.train_subset}-image subset of " if cfg.train_subset else ""
    test = f"{cfg.eval_subset} images of " if cfg.eval_subset else ""
    features = any("feature_gates" in r for r in report["rows"])
    target = "the ensemble of nodes 1…M−1" if space.ensemble_target else space.target_model
    lines = [f"# Final report: study `{report['study']}`", "",
             f"Node 0 ({target}) top-1 (%) on {test}the {cfg.dataset} test split at the last epoch "
             f"({cfg.epochs}) of training on {subset}the whole training split (validation images included), "
             f"mean ± sample std over n seeds; the ensemble averages every node's softmax. Searched graphs are the "
             f"best by the search's validation score (rank); a searched graph equal to a baseline is listed once, "
             "as the baseline. Gates: row t lists the edges into node t, sources in node order, diagonal = labels."
             + (" Feature gates: the attention-transfer edges, in the same form (- : none)." if features else ""),
             "", "| graph | rank | models | gates | " + ("feature gates | " if features else "")
             + "node 0 top-1 | n | ensemble top-1 | per seed |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if features else "")]
    for r in report["rows"]:
        seeds = ", ".join("diverged" if v is None else f"{v:.2f}" for v in r["top1"])
        rank = f"#{r['rank']} (val {r['val_top1']:.2f})" if r["rank"] else ""
        fg = (f"`{r['feature_gates']}` | " if "feature_gates" in r else "- | ") if features else ""
        lines.append(f"| {r['role']} | {rank} | {r['models']} | `{r['gates']}` | {fg}{_fmt(r['mean'], r['std'])} | "
                     f"{r['n']} | {_fmt(r['ensemble_mean'], r['ensemble_std'])} | {seeds} |")
    return "\n".join(lines) + "\n"
