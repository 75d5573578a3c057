"""What a training run writes into its directory, apart from checkpoints.

graph.json/.png/.svg, config.json (the TrainConfig), config.yaml (the command line's resolved
flags, which ``--config`` reads back), metrics.jsonl/.csv, curves.png, edges.png (the edge
diagnostics of the last epoch) and summary.json.

Each is written whole and renamed into place (:func:`.safe_io.write_text`): metrics.jsonl is
rewritten from the history every epoch rather than appended to, so a full disk or a kill
never leaves it with a torn last line.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

from .safe_io import write_text

__all__ = ["write_run_files", "rewrite_metrics", "append_metrics", "write_summary", "merge_cli_yaml"]


def merge_cli_yaml(old_text: Optional[str], new_text: str) -> str:
    """config.yaml of a resumed run: the original run's graph flags, the new run's others.

    A resume takes its graph from graph.json and gets no graph flags, so writing its own
    flags alone would lose the graph that ``--config config.yaml`` needs to reproduce the run.
    """
    import yaml

    from .cli import GRAPH_DESTS

    if not old_text:
        return new_text
    old = yaml.safe_load(old_text) or {}
    new = yaml.safe_load(new_text) or {}
    merged = dict(old)
    merged.update({k: v for k, v in new.items() if k not in GRAPH_DESTS})
    header = new_text.splitlines()[0] + "\n" if new_text.startswith("#") else ""
    return header + yaml.safe_dump(merged, sort_keys=False, default_flow_style=None)


def write_run_files(output: Path, graph, cfg) -> None:
    from .draw import draw_graph

    output.mkdir(parents=True, exist_ok=True)
    graph.save(output / "graph.json")
    values = cfg.to_dict()
    cli_yaml = values.get("extra", {}).pop("cli_yaml", None)
    write_text(output / "config.json", json.dumps(values, indent=2) + "\n")
    if cli_yaml is not None:
        path = output / "config.yaml"
        old = path.read_text() if (cfg.resume and path.is_file()) else None
        write_text(path, merge_cli_yaml(old, cli_yaml))
    for suffix in (".png", ".svg"):
        draw_graph(graph, output / f"graph{suffix}")


def rewrite_metrics(output: Path, history: list[dict], num_nodes: int) -> None:
    """On resume the checkpoint's history is the truth: a line written after it (or a torn one)
    is dropped."""
    write_text(output / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    _write_csv(output, history, num_nodes)


def append_metrics(output: Path, record: dict, history: list[dict], labels: list[str]) -> None:
    """The epoch's ``record`` (the last of ``history``) into metrics.jsonl/.csv and the plots."""
    rewrite_metrics(output, history, len(labels))
    from .plots import plot_curves, plot_edges
    plot_curves(history, labels, output / "curves.png")
    plot_edges(history, labels, output / "edges.png")


def _write_csv(output: Path, history: list[dict], m: int) -> None:
    header = (["epoch"] + [f"top1_{i}" for i in range(m)] + ["ensemble_top1"]
              + [f"train_loss_{i}" for i in range(m)] + [f"lr_{i}" for i in range(m)] + ["time"])
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for r in history:
        top1 = r["top1"] if r["top1"] is not None else [""] * m  # an epoch not evaluated (--eval-every)
        ens = r["ensemble_top1"] if r["ensemble_top1"] is not None else ""
        w.writerow([r["epoch"], *top1, ens, *r["train_loss"], *r["lr"], r["time"]])
    write_text(output / "metrics.csv", buf.getvalue())


def write_summary(output: Path, history: list[dict], nodes, *, epochs: int, split: str, printer=print) -> None:
    evaluated = [r for r in history if r["top1"] is not None]  # --eval-every skips some epochs
    last = evaluated[-1] if evaluated else None
    best = {n.index: max((r["top1"][n.index] for r in evaluated), default=float("nan")) for n in nodes}
    summary = {
        "nodes": [n.spec.model for n in nodes],
        "frozen": [n.frozen for n in nodes],
        # each ensemble node's members (None for a network), only when the graph has one
        **({"ensemble_members": [list(n.members) if n.spec.is_ensemble else None for n in nodes]}
           if any(n.spec.is_ensemble for n in nodes) else {}),
        # each EMA node's network (None for the others), only when the graph has one
        **({"ema_of": [n.spec.of if n.spec.is_ema else None for n in nodes]}
           if any(n.spec.is_ema for n in nodes) else {}),
        "final_top1": last["top1"] if last else None,
        "best_top1": [best[n.index] for n in nodes],
        "final_ensemble_top1": last["ensemble_top1"] if last else None,
        "epochs": epochs,
        "split": split,
    }
    write_text(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    rows = [f"{'node':<28} {'final top-1':>11} {'best top-1':>10}"]
    for n in nodes:
        final = f"{last['top1'][n.index]:.2f}" if last else "-"
        rows.append(f"{n.label:<28} {final:>11} {best[n.index]:>10.2f}")
    if last and len(nodes) > 1:
        # beside ensemble nodes, say which ensemble this is: every network's softmaxes, averaged
        name = "all networks (softmax mean)" if any(n.spec.is_virtual for n in nodes) else "ensemble"
        rows.append(f"{name:<28} {last['ensemble_top1']:>11.2f}")
    printer("\n".join(rows))
