"""Training curves (top-1 and loss by epoch, every node and the ensemble) and edge heat maps."""
from __future__ import annotations

import os
from typing import Sequence

__all__ = ["plot_curves", "plot_edges"]


def plot_curves(history: Sequence[dict], labels: Sequence[str], path: str | os.PathLike) -> None:
    """Draw ``history`` (metrics.jsonl records) to ``path`` (PNG or SVG by suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not history:
        return
    epochs = [r["epoch"] for r in history]
    evaluated = [r for r in history if r["top1"] is not None]  # --eval-every skips some epochs
    eval_epochs = [r["epoch"] for r in evaluated]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    for n, label in enumerate(labels):
        color = colors(n % 10)
        ax_acc.plot(eval_epochs, [r["top1"][n] for r in evaluated], "-o", ms=3, color=color, label=label)
        ax_loss.plot(epochs, [r["train_loss"][n] for r in history], "-o", ms=3, color=color, label=label)
    if len(labels) > 1:
        ax_acc.plot(eval_epochs, [r["ensemble_top1"] for r in evaluated], "--", color="black", label="ensemble")
    split = history[-1].get("split", "test")
    ax_acc.set(xlabel="epoch", ylabel=f"top-1 on {split} (%)", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss $L_t$", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_EDGE_PANELS = (("edge_loss", "edge loss (mean, before the gate)", "viridis", None),
                ("edge_kept", "source right (correct gate keeps)", "Greens", (0.0, 1.0)),
                ("edge_weight", "gate weight", "Blues", (0.0, 1.0)))


def plot_edges(history: Sequence[dict], labels: Sequence[str], path: str | os.PathLike) -> bool:
    """Heat maps of the last epoch's edge diagnostics (rows: target t, columns: source s; the
    diagonal is the label edge; cutoff edges blank). Returns False when there are none to draw."""
    last = next((r for r in reversed(history) if r.get("edge_loss") is not None), None)
    if last is None:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = len(labels)
    ticks = [str(i) for i in range(m)]
    fig, axes = plt.subplots(1, len(_EDGE_PANELS), figsize=(4.2 * len(_EDGE_PANELS), 3.9))
    for ax, (key, title, cmap, limits) in zip(axes, _EDGE_PANELS):
        values = np.array([[np.nan if v is None else v for v in row] for row in last[key]], dtype=float)
        cm = plt.get_cmap(cmap).with_extremes(bad="#eeeeee")
        top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        vmin, vmax = limits if limits is not None else (0.0, max(top, 1e-6))
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cm, vmin=vmin, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if m <= 8:  # beyond that the numbers no longer fit their cells
            for t in range(m):
                for s in range(m):
                    v = values[t, s]
                    text = "cut" if np.isnan(v) else (f"{v:.3g}" if key == "edge_loss" else f"{v:.2f}")
                    r, g, b, _ = cm(image.norm(v)) if not np.isnan(v) else (1, 1, 1, 1)
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # text readable on the cell's colour
                    ax.text(s, t, text, ha="center", va="center", fontsize=9,
                            color="white" if dark else "black")
        ax.set(xticks=range(m), yticks=range(m), xticklabels=ticks, yticklabels=ticks,
               xlabel="source s (diagonal: label)", ylabel="target t", title=title)
    fig.suptitle(f"edges at epoch {last['epoch']} (a sample of {last.get('edge_batches', '?')} batches); "
                 + ", ".join(labels), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
