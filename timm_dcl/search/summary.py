"""What a search leaves in OUTPUT: trials.csv, best_graph.json, top_graphs/, asha.png, search_summary.json."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from .plots import plot_rungs
from .space import SearchSpace, graph_text, split_key
from .storage import SETTINGS_KEY
from .worker import trial_key

__all__ = ["ranked_trials", "top_trials", "write_trials_csv", "write_summary", "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _epochs(t: FrozenTrial) -> int:
    return max(t.intermediate_values, default=0)


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials by value, best first; if none completed, pruned ones by (epochs, value)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if complete:
        return sorted(complete, key=lambda t: (-t.value, t.number))
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    return sorted(pruned, key=lambda t: (-_epochs(t), -t.intermediate_values[_epochs(t)], t.number))


def top_trials(study: optuna.Study, space: SearchSpace, k: int) -> list[FrozenTrial]:
    """The best ``k`` trials of distinct canonical graphs (a replayed duplicate is not a second graph)."""
    seen, out = set(), []
    for t in ranked_trials(study):
        key = trial_key(space, t)
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
        if len(out) == k:
            break
    return out


def _note(t: FrozenTrial) -> str:
    a = t.user_attrs
    if "invalid" in a:
        return "invalid: " + a["invalid"]
    if "error" in a:
        return "error: " + a["error"]
    if "duplicate_of" in a:
        return f"duplicate of trial {a['duplicate_of']} (not trained)"
    if t.state == TrialState.FAIL:
        return "worker lost (no heartbeat)"
    if "same_as_running" in a:
        return f"same graph as trial {a['same_as_running']}, which was still running"
    return ""


def write_trials_csv(study: optuna.Study, space: SearchSpace, path: Path) -> int:
    """One row per trial, its graph in canonical form (surplus reservations are left out)."""
    header = ["number", "state", "value", "epochs", "duration_s", "role", "models", "gates", "feature_gates", "frozen",
              "top1_nodes", "worker", "datetime_start", "note"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    rows = 0
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else ""
        key = trial_key(space, t)
        models, gates, features = split_key(key) if key else ("", "", "")
        w.writerow([t.number, t.state.name, "" if t.value is None else f"{t.value:.4f}", _epochs(t),
                    f"{duration:.1f}" if duration != "" else "", t.user_attrs.get("baseline", ""), models, gates,
                    features,
                    " ".join(str(i) for i in t.user_attrs.get("frozen", [])),
                    " ".join(f"{v:.2f}" for v in t.user_attrs.get("top1", [])),
                    t.user_attrs.get("worker", ""),
                    t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "", _note(t)])
        rows += 1
    atomic_write_text(path, buf.getvalue())
    return rows


def write_summary(study: optuna.Study, space: SearchSpace, output: str | os.PathLike, *, min_resource: int = 1,
                  reduction_factor: int = 2, epochs: int, n_trials: Optional[int] = None, top_k: int = 3) -> str:
    """Write best_graph.json, trials.csv, the top graphs' drawings and the ASHA plot; return a summary."""
    from ..draw import draw_graph

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_trials_csv(study, space, out / "trials.csv")
    top = top_trials(study, space, max(1, top_k))
    best = top[0] if top else None
    plot_rungs(study, out / "asha.png", min_resource=min_resource, reduction_factor=reduction_factor,
               epochs=epochs, best=best.number if best else None)

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    counts = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
    invalid = sum(1 for t in trials if "invalid" in t.user_attrs)
    duplicates = sum(1 for t in trials if "duplicate_of" in t.user_attrs)
    lines = [f"study {study.study_name!r}: {counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]}"
             + (f"/{n_trials}" if n_trials else "") + f" trials finished ({counts[TrialState.COMPLETE]} complete, "
             f"{counts[TrialState.PRUNED]} pruned, {duplicates} of them duplicates not trained again); "
             f"{counts[TrialState.FAIL] - invalid} failed, {invalid} invalid samples rejected, "
             f"{counts[TrialState.RUNNING]} running"]
    summary: dict[str, Any] = {
        "study": study.study_name, "settings": study.user_attrs.get(SETTINGS_KEY),
        "counts": {s.name.lower(): c for s, c in counts.items()}, "invalid": invalid, "duplicates": duplicates,
        "best": None, "top": []}
    draw_dir = out / "top_graphs"
    if best is None:
        lines.append("no trial has finished yet: no best graph")
    else:
        draw_dir.mkdir(exist_ok=True)
        for old in draw_dir.glob("rank*.png"):  # a resumed study may rank other trials now
            old.unlink(missing_ok=True)
        header = f"{'rank':>4} {'trial':>5} {'state':<8} {'top-1':>7} {'epochs':>6}  graph (* frozen)"
        lines += ["", header, "-" * len(header)]
        for rank, t in enumerate(top, 1):
            graph = space.canonical_build(t.params)
            value = t.value if t.value is not None else t.intermediate_values[_epochs(t)]
            draw_graph(graph, draw_dir / f"rank{rank}_trial{t.number}.png",
                       title=f"#{rank}: trial {t.number}, node 0 val top-1 {value:.2f}%")
            role = f"  [{t.user_attrs['baseline']}]" if "baseline" in t.user_attrs else ""
            lines.append(f"{rank:>4} {t.number:>5} {t.state.name.lower():<8} {value:>6.2f}% {_epochs(t):>6}  "
                         f"{graph_text(graph)}{role}")
            summary["top"].append({"rank": rank, "trial": t.number, "state": t.state.name.lower(), "value": value,
                                   "epochs": _epochs(t), "graph": trial_key(space, t),
                                   "baseline": t.user_attrs.get("baseline"), "params": dict(t.params)})
        best_graph = space.canonical_build(best.params)
        tmp = out / f".best_graph.{os.getpid()}.json"
        best_graph.save(tmp)
        os.replace(tmp, out / "best_graph.json")
        summary["best"] = summary["top"][0]
        lines += ["", f"best graph (trial {best.number}) → {out / 'best_graph.json'}",
                  *("  " + line for line in best_graph.describe().splitlines())]
        if best.state != TrialState.COMPLETE:
            lines.append("  (no trial completed its epochs: this is the pruned trial that got furthest)")
    atomic_write_text(out / "search_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return "\n".join(lines)
