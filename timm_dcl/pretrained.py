"""Pre-trained nodes on disk: ``PRETRAINED_DIR/<dataset>/<model>.pth``.

The search draws frozen teachers from such a folder, and graph transfer re-points a
graph's frozen nodes at the teachers trained on the new data set.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from .checkpoint import node_weights_name
from .graph import Graph

__all__ = ["pretrained_path", "find_pretrained", "retarget_pretrained"]


def pretrained_path(pretrained_dir: str | os.PathLike, dataset: str, model: str) -> Path:
    """Where a pre-trained node's weights go: ``PRETRAINED_DIR/<dataset>/<model>.pth``."""
    return Path(pretrained_dir) / dataset / f"{model}.pth"


def find_pretrained(pretrained_dir: Optional[str | os.PathLike], dataset: str, model: str) -> Optional[Path]:
    """The checkpoint of ``model`` trained alone on ``dataset``, or None.

    Looks for ``<dir>/<dataset>/<model>.pth`` (a node-weights file), then for the output of
    a one-node run ``train_dcl.py --node-models <model> --output <dir>/<dataset>/<model>``,
    i.e. ``<dir>/<dataset>/<model>/nodes/node0_<model>.pth``.
    """
    if pretrained_dir is None:
        return None
    root = Path(pretrained_dir)
    for path in (pretrained_path(root, dataset, model), root / dataset / model / "nodes" / node_weights_name(0, model)):
        if path.is_file():
            return path.resolve()
    return None


def retarget_pretrained(graph: Graph, pretrained_dir: str | os.PathLike, dataset: str) -> Graph:
    """``graph`` with every frozen node's checkpoint taken from ``pretrained_dir`` for ``dataset``.

    Graph transfer (SPEC §6) with frozen teachers: a graph searched on one data set names
    checkpoints trained on it; training it on another needs the teachers trained there.
    """
    nodes = []
    for i, node in enumerate(graph.nodes):
        if node.frozen:
            ckpt = find_pretrained(pretrained_dir, dataset, node.model)
            if ckpt is None:
                raise FileNotFoundError(f"node {i} ({node.model}) is a frozen pre-trained node, but "
                                        f"{pretrained_path(pretrained_dir, dataset, node.model)} does not exist "
                                        f"(train it alone on {dataset} first)")
            node = dataclasses.replace(node, checkpoint=str(ckpt))
        nodes.append(node)
    return Graph(nodes, [list(row) for row in graph.gates], graph.temperature)
