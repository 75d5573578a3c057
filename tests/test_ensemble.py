"""Ensemble nodes (issue 10, part 1): a virtual node, the mean of its members' logits, that only
teaches; in the graph, its JSON, the command line, the trainer and the run directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_dcl
from timm_dcl.cli import CliError, graph_from_args
from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph, Node
from timm_dcl.trainer import GraphTrainer, ensemble_logits

T, C = "through", "cutoff"


def _cfg(shared_data: Path, tmp_path: Path | None = None, **kw) -> TrainConfig:
    base = dict(dataset="cifar10", data_dir=str(shared_data / "cifar10"), train_subset=48, eval_subset=40,
                epochs=1, batch_size=16, workers=0, progress_bar=False, seed=3, edge_stats_every=1,
                output=str(tmp_path) if tmp_path is not None else None)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def _eval_logits(trainer: GraphTrainer, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node ``index``'s eval-mode logits and the labels, over the whole evaluation split."""
    node = trainer.nodes[index]
    node.raw.eval()
    out, labels = [], []
    for images, y in trainer.data.eval_loader("eval", batch_size=64):
        out.append(node.raw(trainer._inputs(images)[node.norm_key]).float())
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).double().mean().item() * 100


def test_ensemble_teacher_trains_and_reports_its_top1(tmp_path, shared_data):
    graph = Graph.preset("dml", ["resnet20", "resnet20", "ensemble"])
    assert graph.gates[2] == [C, C, C] and graph.ensemble_members(2) == (0, 1)
    trainer = GraphTrainer(graph, _cfg(shared_data, tmp_path / "run"))
    result = trainer.fit()
    record = result.history[-1]
    z0, labels = _eval_logits(trainer, 0)
    z1, _ = _eval_logits(trainer, 1)
    assert record["top1"][2] == pytest.approx(_top1((z0 + z1) / 2, labels))
    assert record["top1"][0] == pytest.approx(_top1(z0, labels))
    # the all-network ensemble (mean of softmaxes) leaves the ensemble node out
    assert record["ensemble_top1"] == pytest.approx(_top1(z0.softmax(1) + z1.softmax(1), labels))
    assert record["lr"][2] == 0.0 and record["train_loss"][2] == 0.0
    # an ensemble node: no optimiser, no weights file, no state in the checkpoint
    assert trainer.node_optimizers.names == ["0", "1"] and len(trainer.node_optimizers.optimizers) == 2
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "nodes").iterdir()) == ["node0_resnet20.pth", "node0_resnet20.pth.sha256",
                                                                 "node1_resnet20.pth", "node1_resnet20.pth.sha256"]
    state = torch.load(out / "checkpoints" / "last.pth", weights_only=False)
    assert state["models"][2] is None and state["models"][0] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ensemble_members"] == [None, None, [0, 1]]
    assert json.loads((out / "graph.json").read_text())["nodes"][2] == {
        "model": "ensemble", "model_kwargs": {}, "checkpoint": None, "frozen": False}
    # the edge from the ensemble into node 0 was measured like any other
    assert len(record["edge_loss"]) == 3 and record["edge_loss"][0][2] is not None


def test_ensemble_node_0_is_the_target_and_its_members_train(shared_data):
    graph = Graph([Node("ensemble", members=[1, 2]), Node("resnet20"), Node("resnet20")],
                  [[C, C, C], [T, T, T], [T, T, T]])
    assert graph.trainable_nodes == (1, 2) and graph.reference_model == "resnet20"
    trainer = GraphTrainer(graph, _cfg(shared_data))
    before = [{k: v.clone() for k, v in trainer.nodes[i].raw.state_dict().items()} for i in (1, 2)]
    result = trainer.fit()
    for i, old in zip((1, 2), before):
        new = trainer.nodes[i].raw.state_dict()
        assert any(not torch.equal(old[k], new[k]) for k in old if new[k].is_floating_point()), f"node {i} did not train"
    z1, labels = _eval_logits(trainer, 1)
    z2, _ = _eval_logits(trainer, 2)
    assert result.history[-1]["top1"][0] == pytest.approx(_top1((z1 + z2) / 2, labels))
    assert result.best_top1 == result.history[-1]["top1"][0]


def test_probs_mean_matches_a_hand_computation_and_differs_from_logits(shared_data):
    graph = Graph.preset("dml", ["resnet20", "resnet20", "ensemble"])
    out = {}
    for mean in ("logits", "probs"):
        trainer = GraphTrainer(graph, _cfg(shared_data, ensemble_mean=mean))
        images, _ = next(iter(trainer.data.eval_loader("eval", batch_size=16)))
        for n in trainer.nodes[:2]:
            n.raw.eval()
        with torch.no_grad():
            out[mean] = trainer._forward(trainer._inputs(images), train=False)[0]
    z0, z1, ens = out["probs"]
    assert torch.equal(z0, out["logits"][0])  # same seed, same members
    hand = torch.log((z0.softmax(1) + z1.softmax(1)) / 2)
    torch.testing.assert_close(ens, hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"][2], (z0 + z1) / 2)
    assert not torch.allclose(ens, out["logits"][2], atol=1e-3)
    with pytest.raises(ValueError, match="--ensemble-mean"):
        ensemble_logits([z0], "median")
    with pytest.raises(ValueError, match="--ensemble-mean"):
        TrainConfig(ensemble_mean="median")


def test_graph_json_round_trip_with_members(tmp_path):
    graph = Graph([Node("resnet20"), Node("resnet20"), Node("wrn16_2"), Node("ensemble", members=[1, 2])],
                  [[T, T, T, T], [T, T, C, C], [C, T, T, C], [C, C, C, C]])
    path = graph.save(tmp_path / "g.json")
    raw = json.loads(path.read_text())
    assert raw["nodes"][3]["members"] == [1, 2] and "members" not in raw["nodes"][0]
    back = Graph.load(path)
    assert back.to_dict() == graph.to_dict() and back.ensemble_members(3) == (1, 2)
    assert back.ensemble_nodes == (3,) and back.trainable_nodes == (0, 1, 2) and back.frozen_nodes == ()
    assert "mean of nodes 1+2" in back.describe()
    # hand-written: no members means every network
    plain = Graph.from_dict({"nodes": ["resnet20", "resnet20", {"model": "ensemble"}],
                             "gates": [[T, T, T], [T, T, T], [C, C, C]]})
    assert plain.ensemble_members(2) == (0, 1)


def test_command_line_ensembles(tmp_path):
    args, _ = train_dcl.parse_args(["--node-models", "resnet20,resnet20,resnet20,ensemble:1+2",
                                    "--ensemble-mean", "probs"])
    graph = graph_from_args(args)
    assert graph.nodes[3].members == [1, 2] and graph.gates[3] == [C] * 4 and graph.gates[0] == [T] * 4
    assert args.ensemble_mean == "probs" and TrainConfig.from_args(args).ensemble_mean == "probs"
    args, _ = train_dcl.parse_args(["--node-models", "ensemble,resnet20,resnet20"])
    assert graph_from_args(args).ensemble_members(0) == (1, 2)
    for bad, match in (("resnet20,ensemble:1+x", "ensemble:N"), ("resnet20,ensemble:5", "out of range")):
        args, _ = train_dcl.parse_args(["--node-models", bad])
        with pytest.raises((CliError, ValueError), match=match):
            graph_from_args(args)
    args, _ = train_dcl.parse_args(["--node-models", "resnet20,ensemble", "--checkpoints", ",x.pth"])
    with pytest.raises(CliError, match="no weights"):
        graph_from_args(args)


def test_command_line_error_is_one_line(capsys):
    assert train_dcl.main(["--node-models", "resnet20,resnet20,ensemble", "--gates",
                           "through,through,through;through,through,through;through,cutoff,cutoff"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_dcl.py: error:") and "ensemble" in err[0]


@pytest.mark.parametrize("nodes, gates, match", [
    # an ensemble with a non-cutoff row
    (["resnet20", "resnet20", Node("ensemble")], [[T, T, T], [T, T, T], [C, T, C]], r"gates\[2\].*all cutoff"),
    # members out of range
    (["resnet20", "resnet20", Node("ensemble", members=[0, 3])], None, "node 3 is out of range"),
    (["resnet20", "resnet20", Node("ensemble", members=[-1])], None, "out of range"),
    # an ensemble of ensembles (itself included)
    (["resnet20", Node("ensemble", members=[0]), Node("ensemble", members=[0, 1])], None, "ensemble of ensembles"),
    (["resnet20", "resnet20", Node("ensemble", members=[2])], None, "ensemble of ensembles"),
    # fewer than 1 member
    (["resnet20", "resnet20", Node("ensemble", members=[])], None, "at least 1 member"),
    ([Node("ensemble"), Node("ensemble", members=[0])], [[C, C], [C, C]], "at least 1 member|ensemble of ensembles"),
    # members on a network
    ([Node("resnet20", members=[1]), "resnet20"], [[T, T], [T, T]], "only an ensemble node"),
    # an ensemble has no weights, no recipe
    (["resnet20", Node("ensemble", checkpoint="x.pth")], [[T, T], [C, C]], "no parameters"),
    (["resnet20", Node("ensemble", lr=0.1)], [[T, T], [C, C]], "no parameters"),
    (["resnet20", Node("ensemble", frozen=True)], [[T, T], [C, C]], "cannot be frozen"),
    (["resnet20", Node("ensemble", members=[0, 0])], [[T, T], [C, C]], "listed twice"),
])
def test_bad_ensembles_get_clear_errors(nodes, gates, match):
    nodes = [Node(n) if isinstance(n, str) else n for n in nodes]
    m = len(nodes)
    if gates is None:
        gates = [[C] * m if n.is_ensemble else [T] * m for n in nodes]
    with pytest.raises((ValueError, TypeError), match=match):
        Graph(nodes, gates)


def test_bad_members_in_json():
    with pytest.raises(ValueError, match="only an ensemble node"):
        Graph.from_dict({"nodes": [{"model": "resnet20", "members": [1]}, "resnet20"], "gates": [[T, T], [T, T]]})
    with pytest.raises(TypeError, match="node indices"):
        Graph.from_dict({"nodes": ["resnet20", {"model": "ensemble", "members": ["0"]}], "gates": [[T, T], [C, C]]})
