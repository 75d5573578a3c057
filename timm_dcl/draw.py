"""Draw a Knowledge Transfer Graph in the style of the paper's figures (PNG or SVG).

Nodes sit on a circle, node 0 (the target) at the top; every non-cutoff edge s → t is a
curved arrow styled by its gate (the two directions of a pair bend apart, so both stay
visible); a label edge is an arrow from a small "label" box into its node. Feature edges
(attention transfer) are purple, with the dash of their gate, and bend wider than the logit
edges so both stay visible.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

from .gates import GATE_NAMES, Gate
from .graph import Graph

__all__ = ["draw_graph", "GATE_STYLES"]

# gate name -> (colour, dash pattern); cutoff edges are not drawn
GATE_STYLES = {
    GATE_NAMES[Gate.THROUGH]: ("#1f5fa8", "solid"),
    GATE_NAMES[Gate.LINEAR]: ("#2e8b3e", (0, (5, 2.5))),
    GATE_NAMES[Gate.CORRECT]: ("#c8412c", (0, (1.2, 1.8))),
}
_SUFFIXES = (".png", ".svg")
_FEATURE_COLOR = "#7a3fa8"  # feature edges: one colour, the gate told by the dash

_TARGET_FILL, _TARGET_EDGE = "#ffe5a8", "#b07800"
_NODE_FILL, _NODE_EDGE = "#e4eefa", "#1f3a5f"
_FROZEN_FILL, _FROZEN_EDGE = "#d9d9d9", "#6b6b6b"


def _node_text(i: int, model: str) -> tuple[str, float]:
    text = f"{i}: {model}"
    if len(text) > 15:  # long timm names: break at an underscore near the middle
        cuts = [k for k, c in enumerate(text) if c == "_"]
        if cuts:
            k = min(cuts, key=lambda k: abs(k - len(text) / 2))
            text = text[:k + 1] + "\n" + text[k + 1:]
    longest = max(len(line) for line in text.split("\n"))
    return text, max(5.0, min(9.5, 9.5 * 13 / max(longest, 13)))


def draw_graph(
        graph: Graph,
        path: Union[str, os.PathLike],
        *,
        title: Optional[str] = None,
) -> Path:
    """Draw ``graph`` to ``path`` (``.png`` or ``.svg``, by suffix) and return the path."""
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a Graph, got {type(graph).__name__}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{os.fspath(path)}: the drawing must be a .png or .svg file, got suffix {path.suffix!r}")
    graph.validate()

    # no pyplot: a bare Figure leaves the caller's backend and figure list alone
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Patch

    m = graph.num_nodes
    node_r = 0.34
    # ring radius grows with M so that neighbouring nodes keep the same gap for their arrows
    ring = 0.0 if m == 1 else max(0.8, 0.62 / math.sin(math.pi / m))
    angles = [math.pi / 2 - 2 * math.pi * i / m for i in range(m)]
    pos = [(ring * math.cos(a), ring * math.sin(a)) for a in angles]
    label_dist, label_w, label_h = node_r + 0.42, 0.38, 0.17

    # data limits hug the drawing; the figure keeps a fixed scale so text fits the nodes for any M
    xs, ys = [], []
    for t, ((x, y), a) in enumerate(zip(pos, angles)):
        xs += [x - node_r, x + node_r]
        ys += [y - node_r, y + node_r]
        if graph.gates[t][t] in GATE_STYLES:
            bx, by = x + label_dist * math.cos(a), y + label_dist * math.sin(a)
            xs += [bx - label_w / 2, bx + label_w / 2]
            ys += [by - label_h / 2, by + label_h / 2]
    margin = 0.12
    x0, x1, y0, y1 = min(xs) - margin, max(xs) + margin, min(ys) - margin, max(ys) + margin
    inch = 1.55  # inches per data unit
    width_in = max((x1 - x0) * inch, 5.2)  # room for the legend's three columns
    height_in = (y1 - y0) * inch
    top_in, bottom_in = 0.55, 0.85  # title, legend
    fig_h = height_in + top_in + bottom_in
    fig = Figure(figsize=(width_in, fig_h), dpi=150)
    ax = fig.add_axes((0.0, bottom_in / fig_h, 1.0, height_in / fig_h))
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)

    circles = []
    for i, node in enumerate(graph.nodes):
        if i == 0:
            fill, edge, lw = _TARGET_FILL, _TARGET_EDGE, 2.6
        elif node.frozen:
            fill, edge, lw = _FROZEN_FILL, _FROZEN_EDGE, 1.4
        else:
            fill, edge, lw = _NODE_FILL, _NODE_EDGE, 1.4
        # an ensemble has no weights of its own: drawn with a dotted outline
        circle = Circle(pos[i], node_r, facecolor=fill, edgecolor=edge, linewidth=lw,
                        linestyle=(0, (1, 1.5)) if node.is_virtual else (0, (3, 1.5)) if node.frozen else "solid",
                        zorder=3)
        ax.add_patch(circle)
        circles.append(circle)
        text, size = _node_text(i, node.model)
        if node.is_ensemble:
            text += "\nof " + "+".join(map(str, graph.ensemble_members(i)))
        elif node.is_ema:
            text += f"\nof {node.of}"
        x, y = pos[i]
        ax.text(x, y + 0.03, text, ha="center", va="center", fontsize=size, zorder=4,
                fontweight="bold" if i == 0 else "normal", color="#1a1a1a", linespacing=1.15)
        role = "target" if i == 0 else ("frozen" if node.frozen else None)
        if node.is_virtual:
            role = "target, virtual" if i == 0 else "virtual"
        if role:
            ax.text(x, y - 0.17, role, ha="center", va="center", fontsize=6.8, zorder=4,
                    style="italic", color=edge)

    def arrow(a, b, gate, patch_a, patch_b, rad, feature=False):
        color, dash = GATE_STYLES[gate]
        if feature:
            color = _FEATURE_COLOR
        style = dict(patchA=patch_a, patchB=patch_b, connectionstyle=f"arc3,rad={rad}", color=color, zorder=2)
        # a dashed shaft, then a solid head on its own: a dash pattern would fray the head's outline
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-", linewidth=1.6, linestyle=dash,
                                     shrinkA=2, shrinkB=6, **style))
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>,head_length=5,head_width=2.6", linewidth=0,
                                     shrinkA=2, shrinkB=2, **style))

    for t in range(m):
        for s in range(m):
            gate = graph.gates[t][s]
            if gate not in GATE_STYLES or s == t:
                continue
            arrow(pos[s], pos[t], gate, circles[s], circles[t], 0.22)
    if graph.has_feature_edges:
        for t in range(m):
            for s in range(m):
                gate = graph.feature_gates[t][s]
                if gate in GATE_STYLES and s != t:
                    arrow(pos[s], pos[t], gate, circles[s], circles[t], 0.5, feature=True)

    # label edges: a small box outside the ring, radially beyond the node, with an arrow in
    for t in range(m):
        gate = graph.gates[t][t]
        if gate not in GATE_STYLES:
            continue
        a = angles[t]
        x, y = pos[t]
        bx, by = x + label_dist * math.cos(a), y + label_dist * math.sin(a)
        w, h = label_w, label_h
        box = FancyBboxPatch((bx - w / 2, by - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.05",
                             facecolor="white", edgecolor="#555555", linewidth=0.9, zorder=3)
        ax.add_patch(box)
        ax.text(bx, by, "label", ha="center", va="center", fontsize=7, color="#333333", zorder=4)
        arrow((bx, by), (x, y), gate, box, circles[t], 0.0)

    if title is None:
        title = f"Knowledge transfer graph: {m} node{'s' if m != 1 else ''}, T = {graph.temperature:g}"
    fig.suptitle(title, fontsize=11, y=1 - 0.2 / fig_h, va="top")

    handles = [Line2D([], [], color=c, linestyle=d, linewidth=1.8, label=g) for g, (c, d) in GATE_STYLES.items()]
    handles += [
        Patch(facecolor=_TARGET_FILL, edgecolor=_TARGET_EDGE, linewidth=2, label="target (node 0)"),
        Patch(facecolor=_NODE_FILL, edgecolor=_NODE_EDGE, label="trainable"),
        Patch(facecolor=_FROZEN_FILL, edgecolor=_FROZEN_EDGE, linestyle=(0, (3, 1.5)), label="frozen (pre-trained)"),
    ]
    if graph.has_feature_edges:
        handles.append(Line2D([], [], color=_FEATURE_COLOR, linewidth=1.8,
                              label=f"feature edge (stage {graph.feature_stage}; dash: gate)"))
    if graph.ensemble_nodes:
        handles.append(Patch(facecolor=_NODE_FILL, edgecolor=_NODE_EDGE, linestyle=(0, (1, 1.5)),
                             label="ensemble (mean of its members)"))
    if graph.ema_nodes:
        handles.append(Patch(facecolor=_NODE_FILL, edgecolor=_NODE_EDGE, linestyle=(0, (1, 1.5)),
                             label="ema (EMA of its node's weights)"))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False,
               title="edge s → t by gate (cutoff edges not drawn)", title_fontsize=8,
               bbox_to_anchor=(0.5, 0.05 / fig_h))

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=suffix[1:])
    return path
