"""Training curves: top-1 and loss by epoch for every node (and the ensemble)."""
from __future__ import annotations

import os
from typing import Sequence

__all__ = ["plot_curves"]


def plot_curves(history: Sequence[dict], labels: Sequence[str], path: str | os.PathLike) -> None:
    """Draw ``history`` (metrics.jsonl records) to ``path`` (PNG or SVG by suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not history:
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    for n, label in enumerate(labels):
        color = colors(n % 10)
        ax_acc.plot(epochs, [r["top1"][n] for r in history], "-o", ms=3, color=color, label=label)
        ax_loss.plot(epochs, [r["train_loss"][n] for r in history], "-o", ms=3, color=color, label=label)
    if len(labels) > 1:
        ax_acc.plot(epochs, [r["ensemble_top1"] for r in history], "--", color="black", label="ensemble")
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
