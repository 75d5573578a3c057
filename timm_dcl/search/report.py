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
import hashlib
import json
import math
import os
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import optuna

from ..config import RECIPE_FIELDS
from ..graph import Graph
from ..run_state import NoUsableCheckpointError
from .plots import plot_report
from .space import CanonicalGraph, SearchSpace
from .stats import paired_difference, verdict
from .summary import atomic_write_text, top_trials

__all__ = ["ReportSettings", "ReportGraph", "report_graphs", "run_report"]

#: Settings of a finished run that must match the report's, or its result is not comparable.
RECIPE_KEYS = ("dataset", "eval_subset", "eval_split") + RECIPE_FIELDS


_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class ReportSettings:
    top: int = 3  # searched graphs, best validation score first
    seeds: int = 3  # runs per graph
    poll_interval: float = 5.0  # how often a worker checks the runs other workers hold
    # more graphs to report, (role, graph JSON file): trained as their files say (models, gates,
    # temperature, checkpoints, node lr) under the study's recipe, over the same seeds
    graphs: tuple[tuple[str, str], ...] = ()
    # the rows every row is compared with (paired by seed); None: every row that is not searched
    vs: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        for name, low in (("top", 0), ("seeds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--report-{name} must be an integer ≥ {low}, got {value!r}")
        roles = [role for role, _ in self.graphs]
        for role in roles:
            if not _ROLE.fullmatch(role) or role == "searched":
                raise ValueError(f"--report-graphs: {role!r} is not a usable name (letters, digits, _ . + -; "
                                 "not 'searched')")
        if len(set(roles)) < len(roles):
            raise ValueError(f"--report-graphs: a name is given twice ({', '.join(sorted(roles))})")
        if self.vs is not None and not self.vs:
            raise ValueError("--report-vs names no row")


@dataclass
class ReportGraph:
    role: str  # "searched", the baseline's name, or an extra graph's name
    canon: Optional[CanonicalGraph] = None  # a graph of the search space
    rank: Optional[int] = None  # its rank among the searched graphs
    trial: Optional[int] = None
    val_top1: Optional[float] = None  # the search's score (validation split)
    graph: Optional[Graph] = None  # an extra graph (--report-graphs), trained as its file says
    name: str = ""  # its name in the table and in "vs": the role, made unique where roles repeat

    @property
    def id(self) -> str:
        if self.canon is not None:
            return self.canon.id
        # a changed file is another graph: its runs go elsewhere rather than being mixed in
        digest = hashlib.sha1(json.dumps(self.graph.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.role}-{digest}"

    @property
    def models_text(self) -> str:
        if self.canon is not None:
            return self.canon.models_text
        return ",".join(f"ensemble:{'+'.join(map(str, n.members))}" if n.is_ensemble and n.members
                        else f"ema:{n.of}" if n.is_ema else n.model
                        for n in self.graph.nodes)

    @property
    def gates_text(self) -> str:
        if self.canon is not None:
            return self.canon.gates_text
        return ";".join(",".join(row) for row in self.graph.gates)

    @property
    def feature_gates_text(self) -> Optional[str]:
        if self.canon is not None:
            return self.canon.feature_gates_text if self.canon.feature_gates else None
        if not self.graph.has_feature_edges:
            return None
        return ";".join(",".join(row) for row in self.graph.feature_gates)

    def build(self, space: SearchSpace) -> Graph:
        return space.build_canonical(self.canon) if self.canon is not None else self.graph

    def temperature(self, space: SearchSpace) -> float:
        return space.temperature if self.canon is not None else self.graph.temperature


def report_graphs(study: optuna.Study, space: SearchSpace, top: int, *, baselines: bool = True,
                  extra: tuple[tuple[str, str], ...] = ()) -> list[ReportGraph]:
    """The baselines, the extra graphs (``(name, graph JSON file)``), then the top ``top`` searched
    graphs; a searched graph equal to a baseline is listed once, as the baseline, with its rank."""
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
    taken = {row.role for row in rows}
    extras = []
    for role, path in extra:
        if role in taken:
            raise ValueError(f"--report-graphs: {role!r} is already a row of this report (a baseline's name)")
        try:
            graph = Graph.load(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"--report-graphs {role}={path}: no such file") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--report-graphs {role}={path}: {' '.join(str(e).split())}") from None
        extras.append(ReportGraph(role, graph=graph))
    searched = [r for r in rows if r.role == "searched"]
    rows = [r for r in rows if r.role != "searched"] + extras + searched
    counts = Counter(r.role for r in rows)
    for r in rows:
        r.name = (f"searched #{r.rank}" if r.role == "searched" else
                  r.role if counts[r.role] == 1 else f"{r.role} {r.models_text}")
    return rows


def _run_dir(output: Path, g: ReportGraph, seed_index: int) -> Path:
    return output / "report" / g.id / f"seed{seed_index}"


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
        try:
            record = json.loads(line)
        except ValueError:  # a torn or empty line (an older run's): not a finished epoch
            continue
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
    graphs = report_graphs(study, space, settings.top, baselines=baselines, extra=settings.graphs)
    if not graphs:
        raise ValueError(f"study {study.study_name!r} has no finished trial and --no-baselines is set: "
                         "nothing to report")
    vs = _comparisons(graphs, settings.vs)  # checked before anything trains
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
                graph = g.build(space)
                features = f" features [{g.feature_gates_text}]" if g.feature_gates_text else ""
                say(f"report: {'resuming' if resume else 'training'} {g.name} {g.models_text} "
                    f"[{g.gates_text}]{features} seed {k} → {run}")
                start = time.perf_counter()

                def train(resume_from: Optional[str]) -> None:
                    with open(run.with_name(f"seed{k}.log"), "a", buffering=1) as log, \
                            contextlib.redirect_stdout(log):
                        train_graph(graph, dataclasses.replace(seed_cfg, resume=resume_from), data=data)

                try:
                    try:
                        train(str(run) if resume else None)
                    except NoUsableCheckpointError as e:  # neither last.pth nor last.prev.pth loads
                        # said here, outside the seed's log: a run lost to damage is news for the user
                        say(f"report: {g.id}/seed{k}: {e}; training it again from the start")
                        train(None)
                except FloatingPointError as e:
                    atomic_write_text(_diverged_marker(run), f"{e}\n")
                    say(f"report: {g.id}/seed{k} diverged: {e}")
                trained += 1
                say(f"report: {g.id}/seed{k} done in {time.perf_counter() - start:.0f}s")
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
        rows.append({"role": g.role, "name": g.name, "rank": g.rank, "trial": g.trial, "val_top1": g.val_top1,
                     "models": g.models_text, "gates": g.gates_text, "temperature": g.temperature(space),
                     # only with an open feature edge: a logit-only study's report.json is as before
                     **({"feature_gates": g.feature_gates_text} if g.feature_gates_text else {}),
                     **({"graph_file": str(dict(settings.graphs)[g.role])} if g.graph is not None else {}),
                     "graph_id": g.id,
                     "seeds": [cfg.seed + k for k in range(settings.seeds)], "top1": top1, "mean": mean, "std": std,
                     "n": len(finished), "diverged": len(top1) - len(finished),
                     "ensemble_top1": ens, "ensemble_mean": ens_mean, "ensemble_std": ens_std,
                     "runs": [str(_run_dir(out, g, k).relative_to(out)) for k in range(settings.seeds)]})
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        # paired by seed index: seed k of both rows saw the same data from the same node-0 start
        r["vs"] = {b: {**paired_difference(r["top1"], by_name[b]["top1"]),
                       "verdict": None} for b in vs if b != r["name"]}
        for entry in r["vs"].values():
            entry["verdict"] = verdict(entry)
    report = {"study": study.study_name, "epochs": cfg.epochs, "split": "test", "epoch": "last",
              "seeds": settings.seeds, "top": settings.top, "trained": trained, "vs": vs, "rows": rows}
    if write:
        atomic_write_text(out / "report.json", json.dumps(rows, indent=2) + "\n")
        atomic_write_text(out / "report.md", _markdown(report, space, cfg))
        plot_report(rows, out / "report.png", vs=vs,
                    title=f"{study.study_name}: node 0 ({space.target_model}) on the test split, last epoch "
                          f"({cfg.epochs}), {settings.seeds} seed(s)")
    return report


def _comparisons(graphs: list[ReportGraph], wanted: Optional[tuple[str, ...]]) -> list[str]:
    """The names of the rows every row is compared with: ``wanted`` (checked), else every row that
    is not a searched graph."""
    names = [g.name for g in graphs]
    if wanted is None:
        return [g.name for g in graphs if g.role != "searched"]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(f"--report-vs: no row named {', '.join(map(repr, unknown))}; the rows are "
                         f"{', '.join(map(repr, names))}")
    return list(dict.fromkeys(wanted))


def _fmt_vs(entry: Optional[dict]) -> str:
    """``+1.32 [+0.41, +2.23] better``; without an interval ``+1.32 (n = 1)``."""
    if entry is None:
        return "—"
    if entry["diff"] is None:
        return "-"
    if entry["ci"] is None:
        return f"{entry['diff']:+.2f} (n = {entry['n']})"
    lo, hi = entry["ci"]
    return f"{entry['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}] {entry['verdict']}"


def _fmt(mean: Optional[float], std: Optional[float]) -> str:
    return "-" if mean is None or math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _markdown(report: dict, space: SearchSpace, cfg) -> str:
    subset = f"a {cfg.train_subset}-image subset of " if cfg.train_subset else ""
    test = f"{cfg.eval_subset} images of " if cfg.eval_subset else ""
    features = any("feature_gates" in r for r in report["rows"])
    target = "the ensemble of nodes 1…M−1" if space.ensemble_target else space.target_model
    vs = report["vs"]
    lines = [f"# Final report: study `{report['study']}`", "",
             f"Node 0 ({target}) top-1 (%) on {test}the {cfg.dataset} test split at the last epoch "
             f"({cfg.epochs}) of training on {subset}the whole training split (validation images included), "
             f"mean ± sample std over n seeds; the ensemble averages every node's softmax. Searched graphs are the "
             f"best by the search's validation score (rank); a searched graph equal to a baseline is listed once, "
             "as the baseline. Gates: row t lists the edges into node t, sources in node order, diagonal = labels."
             + (" Feature gates: the attention-transfer edges, in the same form (- : none)." if features else "")
             + (" Columns `vs X`: the row's top-1 minus X's, paired by seed (seed k of both saw the same data from "
                "the same node-0 weights), mean [95 % Student-t interval] over the seeds both have, and the "
                "verdict: better or worse when the interval excludes 0, tie when it contains it." if vs else ""),
             "", "| graph | rank | models | gates | T | " + ("feature gates | " if features else "")
             + "node 0 top-1 | n | " + "".join(f"vs {b} | " for b in vs) + "ensemble top-1 | per seed |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if features else "") + "---|" * len(vs)]
    for r in report["rows"]:
        seeds = ", ".join("diverged" if v is None else f"{v:.2f}" for v in r["top1"])
        rank = f"#{r['rank']} (val {r['val_top1']:.2f})" if r["rank"] else ""
        fg = (f"`{r['feature_gates']}` | " if "feature_gates" in r else "- | ") if features else ""
        cols = "".join(f"{_fmt_vs(r['vs'].get(b))} | " for b in vs)
        lines.append(f"| {r['name']} | {rank} | {r['models']} | `{r['gates']}` | {r['temperature']:g} | {fg}"
                     f"{_fmt(r['mean'], r['std'])} | {r['n']} | {cols}"
                     f"{_fmt(r['ensemble_mean'], r['ensemble_std'])} | {seeds} |")
    return "\n".join(lines) + "\n"
