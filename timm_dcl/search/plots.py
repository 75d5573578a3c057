"""The search's figures: ASHA's curves (asha.png) and the final report's seeds (report.png)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import optuna
from optuna.trial import TrialState

from .storage import rung_epochs

__all__ = ["plot_rungs", "plot_report", "gate_marks"]


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def plot_rungs(study: optuna.Study, path: Path, *, min_resource: int, reduction_factor: int, epochs: int,
               best: Optional[int] = None) -> None:
    """Every trial's node-0 validation top-1 by epoch; rungs dashed, pruned trials end in ×."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    styles = {TrialState.COMPLETE: ("#1f5fa8", 0.8), TrialState.PRUNED: ("#8c8c8c", 0.5),
              TrialState.RUNNING: ("#e08a00", 0.8), TrialState.FAIL: ("#c8412c", 0.4)}
    seen = set()
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values or t.state not in styles:
            continue
        xs = sorted(t.intermediate_values)
        ys = [t.intermediate_values[x] for x in xs]
        color, alpha = styles[t.state]
        seen.add(t.state)
        is_best = t.number == best
        ax.plot(xs, ys, "-", color="black" if is_best else color, alpha=1.0 if is_best else alpha,
                lw=2.2 if is_best else 0.9, zorder=3 if is_best else 2)
        marker = "x" if t.state == TrialState.PRUNED else "o"
        ax.plot(xs[-1:], ys[-1:], marker, color="black" if is_best else color, ms=5 if marker == "x" else 3,
                alpha=1.0 if is_best else alpha, zorder=3)
    for k, r in enumerate(rung_epochs(min_resource, reduction_factor, epochs)):
        ax.axvline(r, color="#555555", ls="--", lw=0.7, zorder=1)
        ax.annotate(f"rung {k}", (r, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="#555555")
    # Legend entries drawn apart from the trials: the best trial is black whatever its state.
    for state in (s for s in styles if s in seen):
        color, alpha = styles[state]
        ax.plot([], [], "-", color=color, alpha=alpha, lw=0.9, label=state.name.lower())
    if best is not None:
        ax.plot([], [], "-", color="black", lw=2.2, label=f"best (trial {best})")
    if epochs > 8:  # rungs are evenly spaced on a log scale
        ax.set_xscale("log", base=reduction_factor)
    else:
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="node 0 top-1 on the validation split (%)",
           title=f"ASHA: {len(study.trials)} trials (pruned ones end in ×)")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, Path(path))


_GATE_MARKS = {"through": "T", "cutoff": "-", "linear": "L", "correct": "C"}


def gate_marks(gates: str | Sequence[Sequence[str]]) -> str:
    """A gate matrix (or its CLI text) in one glance: rows split by |, e.g. T--|-T-|--T."""
    rows = [r.split(",") for r in gates.split(";")] if isinstance(gates, str) else gates
    return "|".join("".join(_GATE_MARKS.get(g, "?") for g in row) for row in rows)


_VERDICT_COLORS = {"better": "#2a8c3a", "worse": "#c0392b", "tie": "#8c8c8c", None: "#8c8c8c"}


def plot_report(rows: Sequence[dict], path: Path, *, title: Optional[str] = None, vs: Sequence[str] = ()) -> None:
    """One line per graph: every seed's node-0 test top-1 as a dot, the mean ± std as a bar; then,
    for each compared row (``vs``, at most 4 drawn), every row's paired difference from it with
    its 95 % interval (green: better, red: worse, grey: tie or no interval)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    drawn = list(vs)[:4]
    fig = Figure(figsize=(9 + 3.2 * len(drawn), 1.6 + 0.5 * max(1, len(rows))))
    axes = fig.subplots(1, 1 + len(drawn), sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [9] + [3.2] * len(drawn)})[0]
    ax = axes[0]
    labels = []
    show_models = len({row["models"] for row in rows}) > 1
    for y, row in enumerate(rows):
        color = "#1f5fa8" if row["role"] == "searched" else "#8c8c8c"
        seeds = [v for v in row["top1"] if v is not None]
        ax.scatter(seeds, [y] * len(seeds), s=22, color=color, alpha=0.8, zorder=3)
        if seeds:
            ax.errorbar([row["mean"]], [y], xerr=[row["std"] or 0.0], fmt="|", ms=14, color="black", capsize=4,
                        zorder=4)
        rank = f" #{row['rank']}" if row.get("rank") and row["role"] != "searched" else ""
        gates = gate_marks(row["gates"])
        if row.get("feature_gates"):
            gates += f" AT {gate_marks(row['feature_gates'])}"
        labels.append(f"{row.get('name') or row['role']}{rank}  {gates}" + (f"  {row['models']}" if show_models else ""))
    ax.set_yticks(range(len(rows)), labels, fontsize=8, fontfamily="monospace")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("node 0 top-1 (%): dots = seeds, bar = mean ± std\n"
                  "gates by target row" + (" (AT: feature edges)" if any(r.get("feature_gates") for r in rows) else "")
                  + ": T through, - cutoff, L linear, C correct", fontsize=8)
    ax.set_title(title or "final report", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    for ax_vs, base in zip(axes[1:], drawn):
        ax_vs.axvline(0.0, color="black", lw=0.8)
        for y, row in enumerate(rows):
            entry = (row.get("vs") or {}).get(base)
            if entry is None or entry["diff"] is None:
                continue
            color = _VERDICT_COLORS[entry.get("verdict")]
            if entry["ci"] is not None:
                lo, hi = entry["ci"]
                ax_vs.errorbar([entry["diff"]], [y], xerr=[[entry["diff"] - lo], [hi - entry["diff"]]], fmt="o",
                               ms=5, color=color, capsize=3)
            else:
                ax_vs.scatter([entry["diff"]], [y], s=22, color=color, marker="x")
        ax_vs.set_title(f"− {base}", fontsize=9)
        ax_vs.set_xlabel("paired difference (points),\nmean and 95 % interval", fontsize=8)
        ax_vs.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, Path(path))
