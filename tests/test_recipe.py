"""The recipe: timm's optimisers and schedulers per node, one step for all nodes, the gate clock."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph, Node
from timm_dcl.recipe import (GateClock, NodeOptimizers, build_node_optimizer, build_scheduler, check_optimizer_names,
                             lr_at_epoch, planned_lrs)


def _nets(m: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)) for _ in range(m)]


def test_default_recipe_gives_todays_learning_rates():
    # The paper's recipe (SPEC §4): ×0.1 at 30/60/90 % of the epochs, 0-based epochs 60, 120, 180.
    cfg = TrainConfig(epochs=200)
    got = [lr_at_epoch(cfg, e) for e in (0, 59, 60, 119, 120, 179, 180, 199)]
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    cos = TrainConfig(epochs=10, sched="cosine")
    assert [lr_at_epoch(cos, e) for e in range(10)] == pytest.approx(
        [0.05 * (1 + __import__("math").cos(__import__("math").pi * e / 10)) for e in range(10)])


def test_adamw_warmup_cosine_learning_rates_per_epoch():
    cfg = TrainConfig(epochs=10, opt="adamw", lr=1e-3, weight_decay=0.05, sched="cosine", warmup_epochs=3,
                      warmup_lr=1e-6, min_lr=1e-5)
    lrs = [row[0] for row in planned_lrs(cfg)]
    # linear warm-up from warmup_lr, then timm's cosine down towards min_lr
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[1] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 3)
    assert lrs[2] == pytest.approx(1e-6 + 2 * (1e-3 - 1e-6) / 3)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # decaying after the warm-up
    assert min(lrs[3:]) > 1e-5 and max(lrs[3:]) <= 1e-3


def test_node_overrides_make_their_own_optimisers():
    cfg = TrainConfig(epochs=4, lr=0.1, weight_decay=5e-4)
    nets = _nets(2)
    specs = [Node("a"), Node("b", lr=1e-3, opt="adamw", weight_decay=0.05)]
    opts = [build_node_optimizer(n, s, cfg) for n, s in zip(nets, specs)]
    assert type(opts[0]).__name__ == "SGD" and opts[0].param_groups[0]["nesterov"] is True
    assert type(opts[1]).__name__ == "AdamW"
    assert {g["lr"] for g in opts[0].param_groups} == {0.1}
    assert {g["lr"] for g in opts[1].param_groups} == {1e-3}
    assert {g["weight_decay"] for g in opts[1].param_groups} == {0.05}
    # the paper decays every parameter; --opt-filter-bias-bn gives timm's filtering
    assert {g["weight_decay"] for g in opts[0].param_groups} == {5e-4}
    filtered = build_node_optimizer(nets[0], specs[0], TrainConfig(opt_filter_bias_bn=True))
    assert {g["weight_decay"] for g in filtered.param_groups} == {0.0, 5e-4}
    # one scheduler over both keeps each node's own base lr
    both = NodeOptimizers(opts)
    sched = build_scheduler(both, TrainConfig(epochs=4, sched="cosine"), epochs=4, updates_per_epoch=1)
    sched.step(2)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.05)
    assert opts[1].param_groups[0]["lr"] == pytest.approx(5e-4)


def test_unknown_optimiser_is_named():
    graph = Graph([Node("resnet20"), Node("resnet20", opt="adamx")], [["through"] * 2] * 2)
    with pytest.raises(ValueError, match=r"--node-opt 1:adamx: timm has no optimiser of that name \(close: .*adam"):
        check_optimizer_names(graph, TrainConfig())
    with pytest.raises(ValueError, match="--opt sgdd"):
        check_optimizer_names(Graph([Node("resnet20")], [["through"]]), TrainConfig(opt="sgdd"))


def test_node_optimizers_step_together_and_round_trip():
    nets = _nets(3)
    cfg = TrainConfig()
    both = NodeOptimizers([build_node_optimizer(n, Node("x"), cfg) for n in nets])
    assert len(both.param_groups) == sum(len(o.param_groups) for o in both.optimizers)
    before = [n[0].weight.detach().clone() for n in nets]
    x = torch.randn(5, 4)
    sum(n(x).square().mean() for n in nets).backward()
    both.step()
    both.zero_grad()
    assert all(not torch.equal(b, n[0].weight) for b, n in zip(before, nets))
    assert all(p.grad is None for n in nets for p in n.parameters())
    state = both.state_dict()
    fresh = NodeOptimizers([build_node_optimizer(n, Node("x"), cfg) for n in nets])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.optimizers[2].state[nets[2][0].weight]["momentum_buffer"],
                       both.optimizers[2].state[nets[2][0].weight]["momentum_buffer"])
    with pytest.raises(ValueError, match="for 3 nodes, expected 2"):
        NodeOptimizers(fresh.optimizers[:2]).load_state_dict(state)


def _scaled_steps(optimizers, scaler: torch.amp.GradScaler, nets, steps: int, *, inf_at: int = -1, per_node: bool):
    """Accelerate's step logic: scaler.step(opt) then scaler.update() for each prepared optimiser."""
    x = torch.randn(8, 4)
    for k in range(steps):
        loss = sum(n(x).square().mean() for n in nets)
        scaler.scale(loss).backward()
        if k == inf_at:
            nets[1][0].weight.grad[0, 0] = float("inf")
        for opt in (optimizers if per_node else [optimizers]):
            scaler.step(opt)
            scaler.update()
        for n in nets:
            n.zero_grad(set_to_none=True)


def test_fp16_scaler_updates_once_per_iteration():
    cfg = TrainConfig()
    nets = _nets(3)
    both = NodeOptimizers([build_node_optimizer(n, Node("x"), cfg) for n in nets])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)
    _scaled_steps(both, scaler, nets, 6, per_node=False)
    assert scaler.get_scale() == 2.0 ** 8 * 2 ** 3  # grows once every 2 iterations
    # One non-finite gradient in any node skips the step of all nodes and halves the scale once.
    weights = [n[2].weight.detach().clone() for n in nets]
    _scaled_steps(both, scaler, nets, 1, inf_at=0, per_node=False)
    assert scaler.get_scale() == 2.0 ** 10
    assert all(torch.equal(w, n[2].weight) for w, n in zip(weights, nets))
    # What one optimiser per node did (the bug): M updates per iteration, growth M times too fast.
    nets = _nets(3)
    opts = [build_node_optimizer(n, Node("x"), cfg) for n in nets]
    buggy = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)
    _scaled_steps(opts, buggy, nets, 6, per_node=True)
    assert buggy.get_scale() > 2.0 ** 11


def test_gate_clock_is_k_over_K_and_never_jumps_on_replan():
    clock = GateClock(end_iteration=100)
    assert [clock.progress(k) for k in (1, 50, 100)] == [0.01, 0.5, 1.0]
    assert clock.progress(150) == 1.0
    longer = clock.replanned(60, 200)
    assert longer.progress(60) == pytest.approx(0.6)  # continuous at the resume point
    assert longer.progress(200) == pytest.approx(1.0)
    assert longer.progress(130) == pytest.approx(0.6 + 0.4 * 70 / 140)
    shorter = clock.replanned(60, 80)
    assert shorter.progress(60) == pytest.approx(0.6) and shorter.progress(80) == pytest.approx(1.0)
