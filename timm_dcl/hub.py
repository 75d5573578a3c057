"""Trained nodes as ordinary timm models: a folder timm loads, and a push to the Hugging Face hub.

Every run writes each trained node as ``timm/node<i>_<model>/`` (beside ``nodes/node<i>_<model>.pth``),
the layout of timm's ``save_for_hf``: ``config.json`` (the architecture, its arguments and a pretrained_cfg whose
input size and mean/std are the ones the run fed the node) and ``model.safetensors``. So

    timm.create_model("local-dir:run/timm/node0_resnet50", pretrained=True)
    timm.create_model("resnet50", pretrained=True, num_classes=K,
                      pretrained_cfg_overlay=dict(file="run/timm/node0_resnet50/model.safetensors", num_classes=K))

give the trained network with timm alone (the overlay needs ``num_classes`` too: else timm reads
the name's own class count, finds the classifier does not fit and re-initialises it) (the CIFAR networks need ``import timm_dcl`` first,
which registers them), and ``train_dcl.py --push-to-hub ORG/NAME`` pushes such a node with
timm's ``push_to_hf_hub`` and a model card naming the graph, the data set and the top-1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from .safe_io import write_file

__all__ = ["node_folder_name", "save_node_folder", "node_model_card", "push_nodes", "load_node_folder"]


def node_folder_name(index: int, model: str) -> str:
    return f"node{index}_{model}"


def save_node_folder(folder: str | os.PathLike, model: nn.Module, *, data_config: dict, info: dict) -> Path:
    """``model`` as a folder timm loads: what ``timm.models.save_for_hf`` writes, each file
    atomically. ``data_config``: the input size, mean/std, crop and interpolation the run used;
    ``info``: this run's facts about the node (graph, data set, top-1), kept in config.json."""
    from safetensors.torch import save as safetensors_bytes
    from timm.models._hub import save_config_for_hf  # save_for_hf's config half (not re-exported)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # save_for_hf would save model.state_dict() as it is: a channels_last run's tensors are not
    # contiguous, which safetensors refuses, so the weights are written here (NCHW) and only the
    # config goes through timm.
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = safetensors_bytes(tensors)
    write_file(folder / "model.safetensors", lambda f: f.write(data))
    tmp = folder / f".config.json.tmp{os.getpid()}"
    try:
        save_config_for_hf(model, str(tmp), model_config={"timm_dcl": info}, data_config=data_config)
        os.replace(tmp, folder / "config.json")
    finally:
        tmp.unlink(missing_ok=True)
    return folder


def load_node_folder(folder: str | os.PathLike) -> nn.Module:
    """The trained network of a node folder (timm's ``local-dir:`` loader; eval mode)."""
    import timm

    from . import models  # noqa: F401  (the CIFAR networks, for folders of theirs)

    return timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()


def node_model_card(info: dict, repo_id: str) -> dict:
    """A timm model card (``push_to_hf_hub``'s ``model_card``): the graph, the data set, the top-1."""
    graph = info.get("graph") or {}
    nodes = graph.get("nodes") or []
    gates = graph.get("gates") or []
    index = info.get("node", 0)
    top1 = info.get("top1")
    rows = "\n".join(f"| {t} | {n.get('model')}{' (frozen)' if n.get('frozen') else ''} | "
                     f"{', '.join(gates[t]) if t < len(gates) else ''} |" for t, n in enumerate(nodes))
    description = (
        f"Node {index} ({nodes[index]['model'] if index < len(nodes) else '?'}) of a Knowledge Transfer Graph "
        f"(Minami et al., ACCV 2020) trained with timm-dcl on {info.get('dataset')}: "
        f"{len(nodes)} networks teaching one another, temperature {graph.get('temperature')}.\n\n"
        "| node | model | gates of its edges in (sources in node order; the diagonal is the label) |\n"
        "|---|---|---|\n" + rows)
    return {
        "description": description,
        "details": {
            "Dataset": str(info.get("dataset")),
            "Top-1": f"{top1:.2f} % ({info.get('split')} split, epoch {info.get('epochs')})" if top1 is not None
                     else "not evaluated",
            "Graph": json.dumps(graph, sort_keys=True),
        },
        "usage": f"```python\nimport timm\nmodel = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n```",
    }


def push_nodes(run: str | os.PathLike, repo_id: str, nodes: Sequence[int], *, token: Optional[str] = None,
               private: bool = False) -> list[str]:
    """Push the node folders of ``run`` with timm's ``push_to_hf_hub``: node ``nodes[0]`` to
    ``repo_id``, any further node i to ``repo_id-node<i>``. Returns the repositories pushed."""
    from timm.models import push_to_hf_hub

    run = Path(run)
    pushed = []
    for k, index in enumerate(nodes):
        matches = sorted((run / "timm").glob(f"node{index}_*/config.json"))
        if not matches:
            raise FileNotFoundError(f"--push-nodes {index}: the run wrote no node folder for node {index} "
                                    f"(frozen and ensemble nodes have none)")
        folder = matches[0].parent
        config = json.loads(matches[0].read_text())
        info = config.get("timm_dcl", {})
        model = load_node_folder(folder)
        repo = repo_id if k == 0 else f"{repo_id}-node{index}"
        pc = config.get("pretrained_cfg", {})
        data_config = {key: pc[key] for key in ("input_size", "mean", "std", "crop_pct", "interpolation") if key in pc}
        push_to_hf_hub(model, repo, token=token, private=private, model_card=node_model_card(info, repo),
                       model_config={"timm_dcl": info}, data_config=data_config, safe_serialization=True,
                       commit_message=f"timm-dcl: node {index} of a Knowledge Transfer Graph")
        pushed.append(repo)
    return pushed


def check_push_args(repo_id: Optional[str], push_nodes: Optional[str], graph) -> list[int]:
    """The nodes ``--push-to-hub`` / ``--push-nodes`` will push (none without --push-to-hub),
    checked before the run trains: a repository id, and nodes that train (only they get folders)."""
    import re

    if repo_id is None:
        if push_nodes is not None:
            raise ValueError("--push-nodes needs --push-to-hub ORG/NAME")
        return []
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id) or repo_id.startswith((".", "-")):
        raise ValueError(f"--push-to-hub: {repo_id!r} is no Hugging Face repository id (ORG/NAME or NAME)")
    if push_nodes is None:
        nodes = [0]
    else:
        try:
            nodes = [int(v) for v in push_nodes.split(",")]
        except ValueError:
            raise ValueError(f"--push-nodes {push_nodes!r}: expected node indices, e.g. 0,2") from None
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"--push-nodes {push_nodes!r}: a node is listed twice")
    for i in nodes:
        if not 0 <= i < graph.num_nodes:
            raise ValueError(f"--push-nodes: node {i} is out of range (the graph has nodes 0..{graph.num_nodes - 1})")
        if i not in graph.trainable_nodes:
            what = "an ensemble" if graph.nodes[i].is_ensemble else "frozen"
            raise ValueError(f"--push-nodes: node {i} is {what}: it trains nothing, so the run writes no model of it "
                             "to push")
    return nodes
