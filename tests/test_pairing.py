"""Runs pair across graphs by seed: seed k of every graph sees the same data in the same order
with the same augmentation, and node 0 starts from the same weights wherever its model is the
same (the report's paired differences rest on this)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph, Node
from timm_dcl.trainer import GraphTrainer, node_init_seed

T, C = "through", "cutoff"


def _cfg(shared_data: Path, seed: int) -> TrainConfig:
    return TrainConfig(dataset="cifar10", data_dir=str(shared_data / "cifar10"), train_subset=64, eval_subset=20,
                       epochs=1, batch_size=16, workers=0, progress_bar=False, seed=seed)


def _graphs() -> dict[str, Graph]:
    small = {"depth": 8}
    return {
        "alone": Graph([Node("resnet20", model_kwargs=small)], [[T]]),
        "dml": Graph([Node("resnet20", model_kwargs=small), Node("resnet20", model_kwargs=small)], [[T, T], [T, T]]),
        # a different network before it in no way: node 1 is another family, node 2 an ensemble
        "mixed": Graph([Node("resnet20", model_kwargs=small), Node("wrn16_2"), Node("ensemble", members=(0, 1))],
                       [[T, T, T], [T, T, C], [C, C, C]]),
    }


def _first_batches(trainer: GraphTrainer, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` training batches of epoch 0 as the step sees them (augmented)."""
    trainer.train_loader.set_epoch(0)
    gen = torch.Generator().manual_seed(trainer.cfg.seed * 1_000_003)
    out = []
    for step, (images, labels) in enumerate(trainer.train_loader):
        if step == n:
            break
        out.append((trainer.train_loader.augment(images, gen).clone(), labels.clone()))
    return out


@pytest.mark.parametrize("seed", [0, 5])
def test_seed_k_of_every_graph_starts_node0_alike_on_the_same_data(shared_data, seed):
    trainers = {name: GraphTrainer(g, _cfg(shared_data, seed)) for name, g in _graphs().items()}
    ref = trainers["alone"].nodes[0].raw.state_dict()
    for name, trainer in trainers.items():
        state = trainer.nodes[0].raw.state_dict()
        assert state.keys() == ref.keys()
        for key, value in state.items():
            assert torch.equal(value, ref[key]), f"{name}: node 0's {key} differs from the one-node run's"
    batches = {name: _first_batches(t) for name, t in trainers.items()}
    for name, got in batches.items():
        for (x, y), (x0, y0) in zip(got, batches["alone"]):
            assert torch.equal(y, y0) and torch.equal(x, x0), f"{name}: another batch than the one-node run's"
    # node 1 of the DML graph is not a copy of node 0: its seed mixes in its index
    n0, n1 = (trainers["dml"].nodes[i].raw.state_dict() for i in (0, 1))
    assert any(not torch.equal(n0[k], n1[k]) for k in n0 if n0[k].is_floating_point())


def test_other_seeds_start_node0_elsewhere(shared_data):
    a, b = (GraphTrainer(_graphs()["alone"], _cfg(shared_data, s)).nodes[0].raw.state_dict() for s in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_node_init_seeds_do_not_collide_between_nearby_seeds_and_nodes():
    seeds = {node_init_seed(s, i) for s in range(50) for i in range(8)}
    assert len(seeds) == 50 * 8
