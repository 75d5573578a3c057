"""KTGTask: a Knowledge Transfer Graph as a timm training task (issue 16).

Held to timm's own LogitDistillationTask on the KD graph, to the loss op on DML, and watched
for what it promises: frozen nodes untouched through an optimiser loop, DDP around trainable
nodes only (two gloo processes), one compiled graph for every progress value.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from timm.optim import create_optimizer_v2
from timm.task import LogitDistillationTask

import timm_dcl
from timm_dcl import KTGTask, ktg_loss, ktg_loss_reference

REPO = Path(__file__).resolve().parents[1]
T, C, L, K = "through", "cutoff", "linear", "correct"


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int, name: str = "resnet20", classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=classes)


def _batch(seed: int = 0, b: int = 8, size: int = 32, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, classes, (b,), generator=g)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("teacher_stats", ["same", "imagenet"], ids=["same-norm", "renormalised"])
def test_kd_graph_is_timms_logit_distillation(temperature, teacher_stats):
    student, teacher = _net(0), _net(1)
    for p in teacher.parameters():  # a teacher that is no copy of the student's initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    if teacher_stats == "imagenet":  # the teacher expects other mean/std: both tasks re-normalise for it
        teacher.pretrained_cfg = dict(teacher.pretrained_cfg, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ours = KTGTask([copy.deepcopy(student), copy.deepcopy(teacher)], preset="kd", temperature=temperature,
                   verbose=False)
    timms = LogitDistillationTask(copy.deepcopy(student), copy.deepcopy(teacher), criterion=nn.CrossEntropyLoss(),
                                  temperature=temperature, verbose=False)
    ours.train(), timms.train()
    x, y = _batch()
    a, b = ours(x, y), timms(x, y)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["output"], b["output"])
    assert a["losses"][1] == 0  # the frozen teacher learns nothing
    a["loss"].backward()
    b["loss"].backward()
    ours_student, timm_student = ours.node_module(0), timms.trainable_module
    for (name, p), q in zip(ours_student.named_parameters(), timm_student.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in ours.node_module(1).parameters())


def test_dml_losses_are_the_ops_on_the_nodes_logits():
    nets = [_net(i) for i in range(3)]
    task = KTGTask(nets, preset="dml", verbose=False).train()
    x, y = _batch(1)
    out = task(x, y)
    assert len(out["logits"]) == 3 and out["output"] is out["logits"][0]
    gates = [[T] * 3] * 3
    torch.testing.assert_close(out["losses"], ktg_loss([z.detach() for z in out["logits"]], y, gates))
    # and the readable reference on logits computed here, node by node, from the same input
    with torch.no_grad():
        direct = [net(x) for net in nets]
    torch.testing.assert_close(out["losses"].detach(), ktg_loss_reference(direct, y, gates), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["losses"].sum())


def test_uint8_pixels_and_normalised_input_agree_and_nodes_get_their_own_normalisation():
    a, b = _net(0), _net(1, "test_resnet")  # resnet20: CIFAR mean/std; test_resnet: 0.5/0.5
    task = KTGTask([a, b], preset="dml", verbose=False).eval()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = (torch.tensor(a.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    normalised = (pixels.float() / 255 - mean) / std  # what timm's loader gives node 0
    z_pixels, z_norm = task.node_logits(pixels), task.node_logits(normalised)
    for u, v in zip(z_pixels, z_norm):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(z_norm[1], b((pixels.float() / 255 - 0.5) / 0.5), rtol=1e-4, atol=1e-4)


def _kd3():
    """Node 0 and 1 learn (linear and correct gates too), node 2 a frozen teacher with BatchNorm."""
    nets = [_net(0), _net(1), _net(2)]
    return KTGTask(nets, [[T, L, T], [K, T, C], [C, C, C]], temperature=2.0, verbose=False), nets


def test_frozen_node_stays_bit_identical_through_an_optimiser_loop():
    task, nets = _kd3()
    frozen = {k: v.clone() for k, v in nets[2].state_dict().items()}
    start = {k: v.clone() for k, v in nets[0].state_dict().items()}
    assert task.frozen == (False, False, True) and task.trainable_nodes == (0, 1)
    assert not any(p.requires_grad for p in nets[2].parameters())
    groups = task.param_groups(weight_decay=5e-4, node_lr={1: 0.05})
    assert {g["node"] for g in groups} == {0, 1} and all(g["lr"] == 0.05 for g in groups if g["node"] == 1)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in task.trainable_parameters()}
    opt = create_optimizer_v2(groups, opt="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    task.train()
    assert nets[0].training and nets[1].training and not nets[2].training
    steps = 4
    for k in range(1, steps + 1):
        x, y = _batch(k)
        task.set_progress(k, steps)
        out = task(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert not nets[2].training
    for key, value in nets[2].state_dict().items():
        assert torch.equal(value, frozen[key]), key  # BatchNorm statistics included
    assert not torch.equal(nets[0].state_dict()["fc.weight"], start["fc.weight"])
    assert float(task.progress) == 1.0


def test_task_state_round_trip_and_eval_model():
    task, nets = _kd3()
    task.set_progress(3, 10)
    assert task.get_eval_model() is nets[0]
    state = task.get_checkpoint_state()
    assert set(state["task_state"]["nodes"]) == {1} and state["task_state"]["progress"] == pytest.approx(0.3)
    other, other_nets = _kd3()
    for p in other_nets[1].parameters():
        p.data.zero_()
    other.load_checkpoint_state(state["state_dict"], state["task_state"])
    for a, b in zip(nets[:2], other_nets[:2]):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    assert float(other.progress) == pytest.approx(0.3)


def test_ensemble_node_0_is_the_output_and_a_view_is_its_eval_model():
    nets = [_net(1), _net(2)]
    task = KTGTask(["ensemble", *nets], preset="dml", verbose=False).train()
    x, y = _batch(2)
    out = task(x, y)
    torch.testing.assert_close(out["output"], (out["logits"][1] + out["logits"][2]).detach() / 2)
    assert out["losses"][0] == 0 and task.trainable_nodes == (1, 2)
    task.eval()
    torch.testing.assert_close(task.get_eval_model()(x), (nets[0](x) + nets[1](x)) / 2)


class _Tiny(nn.Module):
    """A network small enough to trace in seconds (compile tests), with BatchNorm."""

    def __init__(self, seed: int, classes: int = 10):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = classes
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


@pytest.mark.parametrize("how", ["torch.compile(task)", "task.compile()"])
def test_compiled_task_takes_every_progress_without_recompiling(how):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    task = KTGTask([_Tiny(0), _Tiny(1), _Tiny(2)], [[T, L, T], [K, T, C], [C, C, C]], temperature=2.0,
                   verbose=False).train()
    counter = CompileCounterWithBackend("aot_eager")
    if how == "task.compile()":
        task.compile(backend=counter, fullgraph=True)
        step = task
    else:
        step = torch.compile(task, backend=counter, fullgraph=True)
    x, y = _batch(3, size=12)
    seen, frames = [], []
    for k in range(1, 6):
        task.set_progress(k, 5)
        out = step(x, y)
        out["loss"].backward()
        frames.append(counter.frame_count)
        seen.append(out["losses"].detach().clone())
        with torch.no_grad():
            eager = task.forward_step(x, y)["losses"]
        torch.testing.assert_close(seen[-1], eager, rtol=1e-5, atol=1e-6)
    assert frames[0] >= 1 and frames[1:] == [frames[0]] * 4, f"recompiled as progress moved: {frames}"
    assert not torch.equal(seen[0][0], seen[-1][0])  # the linear gate's weight did move


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="either gates or a preset"):
        KTGTask([_net(0), _net(1)], [[T, T], [T, T]], preset="dml")
    with pytest.raises(ValueError, match="all-cutoff gate row"):
        KTGTask([_net(0), _net(1)], [[C, C], [T, T]])
    with pytest.raises(ValueError, match="progress"):
        KTGTask([_net(0)], [[T]]).set_progress(3, 2)
    with pytest.raises(ValueError, match="num_classes"):
        KTGTask(["resnet20", "resnet20"], preset="dml")


def test_nodes_by_name_take_node_0s_class_count():
    task = KTGTask([_net(0, classes=7), "resnet20"], preset="dml", verbose=False)
    assert task.node_module(1).num_classes == 7


def test_from_graph_builds_the_graph_json(tmp_path):
    graph = timm_dcl.Graph.preset("dml", ["resnet20", "resnet20"])
    graph.save(tmp_path / "g.json")
    task = KTGTask.from_graph(str(tmp_path / "g.json"), num_classes=10, input_size=(3, 32, 32), verbose=False)
    assert task.trainable_nodes == (0, 1) and task.node_module(1).num_classes == 10
    x, y = _batch(4)
    assert task(x, y)["losses"].shape == (2,)


def test_prepare_distributed_wraps_only_trainable_nodes(tmp_path):
    """Two processes on the CPU (gloo): each trains on its own data, DDP keeps the trainable
    nodes equal, the frozen node is never wrapped and never changes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "task_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert r["wrapped"] == [True, True, False]
        assert r["frozen_unchanged"] and r["moved"]
    for node_a, node_b in zip(ranks[0]["nodes"], ranks[1]["nodes"]):
        for k in node_a:
            assert torch.equal(node_a[k], node_b[k]), k
    assert not torch.equal(ranks[0]["local_grad"], ranks[1]["local_grad"])  # the ranks saw different data


# ------------------------------------------------------------------ what main gained (issues 17, 18)


def test_an_ema_node_gives_its_networks_ema_logits_through_an_optimiser_loop():
    """``ema:1``: every step its logits equal a timm ModelEmaV3 of node 1 kept here, evaluated on
    node 1's own normalisation of the batch (test_resnet: 0.5/0.5, node 0 CIFAR's), without grad;
    ``update_ema`` after each optimiser step keeps the two equal."""
    from timm.utils import ModelEmaV3

    nets = [_net(0), _net(1, "test_resnet")]
    ours = ModelEmaV3(copy.deepcopy(nets[1]), decay=0.7)
    task = KTGTask([*nets, "ema:1"], [[T, T, T], [T, T, C], [C, C, C]], ema_decay=0.7, verbose=False)
    assert task.ema_of == (None, None, 1) and task.trainable_nodes == (0, 1) and task.node_emas.indices == (1,)
    opt = create_optimizer_v2(task.param_groups(), opt="sgd", lr=0.1)
    task.train()
    for k in range(1, 4):
        pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
        y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(k))
        out = task(pixels, y)
        with torch.no_grad():
            expected = ours.module((pixels.float() / 255 - 0.5) / 0.5)
        torch.testing.assert_close(out["logits"][2], expected, rtol=1e-4, atol=1e-5)
        assert not out["logits"][2].requires_grad and not task.node_emas.module(1).training
        assert out["losses"][2] == 0
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.update_ema(step=k)
        ours.update(nets[1], step=k)
    for key, v in task.node_emas.module(1).state_dict().items():
        torch.testing.assert_close(v, ours.module.state_dict()[key], msg=key)
    assert not torch.equal(task.node_emas.module(1).state_dict()["fc.weight"], nets[1].state_dict()["fc.weight"])
    assert any(k.startswith("node_ema.1.") for k in task.state_dict())  # the EMAs travel with the task


def test_from_graph_takes_an_ema_node_and_bad_ema_entries_are_clear():
    graph = timm_dcl.Graph([timm_dcl.Node("resnet20"), timm_dcl.Node("resnet20"), timm_dcl.Node("ema", of=0)],
                           [[T, T, T], [T, T, C], [C, C, C]])
    task = KTGTask.from_graph(graph.to_dict(), num_classes=10, input_size=(3, 32, 32), verbose=False)
    assert task.ema_of == (None, None, 0) and task.node_module(2) is None and task.node_emas.indices == (0,)
    x, y = _batch(5)
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(task.node_logits(x)[2], task.node_emas.module(0)(x))
    with pytest.raises(ValueError, match="ema:N"):
        KTGTask([_net(0), "ema:x"], [[T, C], [C, C]])
    with pytest.raises(ValueError, match="frozen"):  # Graph's own rule: the EMA of a network that trains
        KTGTask([_net(0), _net(1), "ema:1"], [[T, T, T], [C, C, C], [C, C, C]])


def test_soft_targets_reach_the_op_and_feature_edges_take_their_argmax():
    """Float [B, C] targets (mixup, smoothing): the logit edges' losses are the op's on them, the
    attention edges' those of their argmax."""
    nets = [_net(0), _net(1)]
    task = KTGTask(nets, preset="dml", feature_gates=[[C, T], [T, C]], verbose=False).train()
    x, _ = _batch(6)
    soft = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(6)) * 3, dim=1)
    out = task(x, soft)
    hard = task(x, soft.argmax(dim=1))
    feature = out["feature_losses"]
    torch.testing.assert_close(out["losses"] - feature.to(out["losses"].dtype),
                               ktg_loss([z.detach() for z in out["logits"]], soft, [[T, T], [T, T]]))
    torch.testing.assert_close(feature, hard["feature_losses"])
    assert feature.gt(0).all()
    assert not torch.allclose(out["losses"], hard["losses"])  # the soft targets did reach the op


def test_pixel_stats_are_the_first_networks_normalisation_in_pixel_units():
    nets = [_net(0), _net(1, "test_resnet")]
    task = KTGTask(["ensemble:2+1", *nets], preset="dml", verbose=False)
    mean, std = task.pixel_stats()  # the first network in node order: node 1, resnet20
    torch.testing.assert_close(mean.flatten(), torch.tensor(nets[0].pretrained_cfg["mean"]) * 255)
    torch.testing.assert_close(std.flatten(), torch.tensor(nets[0].pretrained_cfg["std"]) * 255)
    torch.testing.assert_close(task.pixel_stats(2)[0].flatten(), torch.full((3,), 0.5 * 255))
    with pytest.raises(ValueError, match="virtual"):
        task.pixel_stats(0)
