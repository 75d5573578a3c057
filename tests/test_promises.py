"""The trainer's promises (README, SPEC §2-§3), each checked by watching what the trainer does.

One module-scoped run of a 3-node graph on real CIFAR-10 images serves most tests: node 0
from scratch, node 1 warm-started from a teacher with its own lr, node 2 that teacher frozen;
linear, through and correct gates. The trainer is observed from outside: the progress and
logits its loss receives, the images it trains on, the lr each optimiser step applies (read
off the parameter update), the weights a node starts its first step with. The same graph is
also interrupted after one epoch and resumed, and must end bit-identical to the straight run.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_dcl
from conftest import read_metrics
from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph, Node
from timm_dcl.trainer import GraphTrainer, TrainResult

T, C, L, K = "through", "cutoff", "linear", "correct"
# Both runs draw the same class-balanced 200 test images (same seed and eval subset).
DATA = dict(dataset="cifar10", eval_subset=200, batch_size=32, workers=0, progress_bar=False, seed=0)
TRAIN_IMAGES = 96  # 3 iterations per epoch
EPOCHS = 2
LR = (0.1, 0.05)  # node 0 (the run's --lr), node 1 (its own)


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _no_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cifar10) -> Path:
    """A resnet20 trained for 3 short epochs: well above chance on the 200 test images."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig(data_dir=cifar10, **DATA, train_subset=256, epochs=3, sched="cosine", output=str(out))
    result = GraphTrainer(Graph([Node("resnet20")], [[T]]), cfg).fit()
    # Chance is 10 % (20 of 200); a teacher at chance would hide what its drift does.
    assert result.final_top1 >= 18.0, result.history
    return out / "nodes" / "node0_resnet20.pth"


def _graph(teacher: Path) -> Graph:
    return Graph([Node("resnet20"), Node("resnet20", checkpoint=str(teacher), lr=LR[1]),
                  Node("resnet20", checkpoint=str(teacher))],
                 [[T, L, T], [L, T, K], [C, C, C]], temperature=2.0)


def _config(cifar10: str, **kw) -> TrainConfig:
    return TrainConfig(data_dir=cifar10, **DATA, train_subset=TRAIN_IMAGES, epochs=EPOCHS, lr=LR[0],
                       decay_milestones=[1], **kw)


def _accelerator(init_scale: float):
    """Accelerate keeps no GradScaler on the CPU; give it one, as on a GPU under fp16, so that its
    state is part of what a resume must restore."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    return acc


@dataclass
class Watch:
    """What a trainer did, recorded from outside it."""
    progress: list[float] = field(default_factory=list)
    frozen_logits: list[torch.Tensor] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # as the nodes got them, augmented, uint8
    step_lrs: dict[int, list[float]] = field(default_factory=dict)  # node -> lr each step applied
    first_step_weights: dict[int, dict] = field(default_factory=dict)


def _effective_lr(opt: torch.optim.Optimizer, p: torch.Tensor, before: torch.Tensor, grad: torch.Tensor) -> float:
    """The lr an SGD step applied to ``p``, from the update it made: p' = p - lr·u with
    u = d + μ·buf' (Nesterov) or buf' (heavy ball), d = grad + wd·p, buf' the new momentum buffer."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    d = grad.double() + group["weight_decay"] * before.double()
    buf = opt.state[p]["momentum_buffer"].double() if group["momentum"] else d
    u = d + group["momentum"] * buf if group["nesterov"] else buf
    delta = before.double() - p.detach().double()
    return float((delta * u).sum() / (u * u).sum())


def _watch(trainer: GraphTrainer) -> Watch:
    w = Watch()
    loss_fn, augment = trainer.loss_fn, trainer.train_loader.augment

    def loss(logits, labels, progress):
        w.progress.append(float(progress))
        w.frozen_logits.append(logits[2].detach().float().clone())
        return loss_fn(logits, labels, progress=progress)

    def augmented(images, generator=None):
        out = augment(images, generator)
        w.images.append(out.clone())
        return out

    trainer.loss_fn, trainer.train_loader.augment = loss, augmented
    for n in trainer.nodes:
        if n.frozen:
            continue
        opt, p, saved = trainer.node_optimizers.optimizers[n.opt_index], n.raw.fc.weight, {}
        w.step_lrs[n.index] = []

        def pre(opt, args, kwargs, p=p, saved=saved):
            saved["p"], saved["g"] = p.detach().clone(), p.grad.detach().clone()  # grad already unscaled

        def post(opt, args, kwargs, p=p, saved=saved, i=n.index):
            w.step_lrs[i].append(_effective_lr(opt, p, saved["p"], saved["g"]))

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)

        def first_call(module, args, i=n.index):
            if i not in w.first_step_weights:
                w.first_step_weights[i] = {k: v.detach().clone() for k, v in module.state_dict().items()}

        n.raw.register_forward_pre_hook(first_call)
    return w


class _Interrupt(Exception):
    pass


def _interrupt(record):
    raise _Interrupt(record["epoch"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar10, teacher):
    """The straight run, and the same run interrupted after epoch 1 then resumed."""
    tmp = tmp_path_factory.mktemp("promises")
    graph = _graph(teacher)
    straight = GraphTrainer(graph, _config(cifar10, output=str(tmp / "straight")), accelerator=_accelerator(2.0 ** 4))
    straight_watch = _watch(straight)
    straight.fit()

    cut = tmp / "cut"
    with pytest.raises(_Interrupt):
        GraphTrainer(graph, _config(cifar10, output=str(cut)), accelerator=_accelerator(2.0 ** 4)).fit(_interrupt)
    saved = torch.load(cut / "checkpoints" / "last.pth", weights_only=False)
    # a fresh scaler with another scale: only what the checkpoint holds can make it match
    resumed = GraphTrainer(graph, _config(cifar10, resume=str(cut)), accelerator=_accelerator(2.0 ** 10))
    scaler_after_load = resumed.accelerator.scaler.state_dict()
    resumed_watch = _watch(resumed)
    resumed.fit()
    return SimpleNamespace(straight=straight, straight_watch=straight_watch, straight_out=tmp / "straight",
                           resumed=resumed, resumed_watch=resumed_watch, resumed_out=cut, saved=saved,
                           scaler_after_load=scaler_after_load, teacher=teacher)


# ------------------------------------------------------------------------------ linear gates


def test_linear_gates_get_k_over_K(runs):
    """SPEC §2: progress = k/K, k the 1-based global iteration, K the run's iterations."""
    per_epoch = len(runs.straight.train_loader)
    total = EPOCHS * per_epoch
    assert runs.straight.total_iterations == total == 6
    assert runs.straight_watch.progress == pytest.approx([k / total for k in range(1, total + 1)], abs=1e-12)
    # the resumed run counts on from the interrupted one's last iteration
    assert runs.resumed_watch.progress == pytest.approx(
        [k / total for k in range(per_epoch + 1, total + 1)], abs=1e-12)


# ------------------------------------------------------------------------------ frozen nodes


def test_frozen_teacher_is_never_changed(runs):
    """SPEC §3: a frozen node runs in eval mode under no_grad: no update, no BatchNorm drift."""
    ckpt = _weights(runs.teacher)
    for trainer in (runs.straight, runs.resumed):
        state = trainer.nodes[2].raw.state_dict()
        assert state.keys() == ckpt.keys()
        changed = [k for k in ckpt if not torch.equal(state[k].cpu(), ckpt[k])]
        assert not changed, f"the frozen teacher changed during training: {changed[:5]}"
    assert any("running_mean" in k for k in ckpt)  # buffers are part of what was compared


def test_frozen_teacher_teaches_with_eval_mode_logits(runs):
    """The logits a frozen teacher hands the loss are its eval-mode logits (running statistics,
    not the batch's), the same as the saved teacher gives on the very images trained on."""
    import timm

    model = timm.create_model("resnet20", num_classes=10)
    model.load_state_dict(_weights(runs.teacher))
    model.eval()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1) * 255
    w = runs.straight_watch
    assert len(w.images) == len(w.frozen_logits) == 6
    with torch.no_grad():
        for images, got in zip(w.images, w.frozen_logits):
            expected = model((images.float() - mean) / std)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_frozen_teacher_scores_what_it_scored_when_saved(runs):
    saved = torch.load(runs.teacher, weights_only=True)["top1"]
    for record in read_metrics(runs.straight_out):
        assert record["top1"][2] == pytest.approx(saved)
        assert record["lr"][2] == 0.0 and record["train_loss"][2] == 0.0


# ------------------------------------------------------------------------------ lr and warm start


def test_each_step_applies_the_scheduled_lr_of_its_node(runs):
    """The lr that each optimiser step applies (read off the update of the classifier's weights):
    the run's --lr for node 0, node 1's own lr, ×0.1 from epoch 2 (--decay-milestones 1)."""
    per_epoch = len(runs.straight.train_loader)
    for node, base in zip((0, 1), LR):
        expected = [base] * per_epoch + [base * 0.1] * per_epoch
        assert runs.straight_watch.step_lrs[node] == pytest.approx(expected, rel=1e-3), node
        assert runs.resumed_watch.step_lrs[node] == pytest.approx(expected[per_epoch:], rel=1e-3), node
    # metrics.jsonl reports, per epoch, the lr the optimisers applied
    assert [lr for r in read_metrics(runs.straight_out) for lr in r["lr"]] == pytest.approx(
        [LR[0], LR[1], 0.0, LR[0] * 0.1, LR[1] * 0.1, 0.0])


def test_warm_start_first_step_uses_the_checkpoint(runs):
    ckpt = _weights(runs.teacher)
    first = runs.straight_watch.first_step_weights[1]
    assert first.keys() == ckpt.keys()
    assert all(torch.equal(first[k].cpu(), ckpt[k]) for k in ckpt)
    # ... while node 0 starts from its own random initialisation
    assert not torch.equal(runs.straight_watch.first_step_weights[0]["conv1.weight"].cpu(), ckpt["conv1.weight"])


# ------------------------------------------------------------------------------ ensemble


def test_ensemble_top1_is_the_mean_of_the_nodes_softmaxes(runs):
    """Recomputed here from the saved weights of every node, on the same evaluation images."""
    import timm

    out = runs.straight_out
    files = [out / "nodes" / "node0_resnet20.pth", out / "nodes" / "node1_resnet20.pth", runs.teacher]
    eval_data = runs.straight.data.eval
    labels = eval_data.labels
    probs, top1 = [], []
    for file in files:
        model = timm.create_model("resnet20", num_classes=10)
        model.load_state_dict(_weights(file))
        model.eval()
        cfg = model.pretrained_cfg
        mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1) * 255
        std = torch.tensor(cfg["std"]).view(1, -1, 1, 1) * 255
        with torch.no_grad():
            z = model((eval_data.images.float() - mean) / std)
        probs.append(z.softmax(dim=1))
        top1.append(float((z.argmax(1) == labels).double().mean() * 100))
    ensemble = float((torch.stack(probs).mean(0).argmax(1) == labels).double().mean() * 100)
    # the check can tell the ensemble from any single node on this run
    assert all(abs(ensemble - t) >= 1.0 for t in top1), (ensemble, top1)
    last = read_metrics(out)[-1]
    assert last["top1"] == pytest.approx(top1, abs=1e-9)
    assert last["ensemble_top1"] == pytest.approx(ensemble, abs=1e-9)


# ------------------------------------------------------------------------------ resume


def test_interrupted_run_with_linear_gates_resumes_bit_identical(runs):
    assert runs.saved["epoch"] == 1 and runs.saved["iteration"] == len(runs.straight.train_loader)
    assert _no_time(read_metrics(runs.resumed_out)) == _no_time(read_metrics(runs.straight_out))
    for name in ("node0_resnet20.pth", "node1_resnet20.pth"):
        a, b = _weights(runs.resumed_out / "nodes" / name), _weights(runs.straight_out / "nodes" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = runs.resumed.node_optimizers.state_dict()["optimizers"]
    b = runs.straight.node_optimizers.state_dict()["optimizers"]
    for sa, sb in zip(a, b):
        assert all(torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"])
                   for i in sb["state"])


def test_loss_scaler_state_survives_a_resume(runs):
    """Mixed precision: the GradScaler's scale and growth tracker are restored, so the resumed
    run scales as the straight one did (growth every 2 steps, 3 steps per epoch)."""
    saved = runs.saved["scaler"]
    assert saved["scale"] == 2.0 ** 5 and saved["_growth_tracker"] == 1  # mid-way to the next growth
    assert runs.scaler_after_load["scale"] == saved["scale"]
    assert runs.scaler_after_load["_growth_tracker"] == saved["_growth_tracker"]
    final = runs.straight.accelerator.scaler.state_dict()
    assert final["scale"] == 2.0 ** 7 and final["_growth_tracker"] == 0
    assert runs.resumed.accelerator.scaler.state_dict() == final


# ------------------------------------------------------------------------------ a loss that is not finite


def test_non_finite_loss_stops_the_run_before_its_checkpoint(tmp_path, cifar10):
    """A diverged epoch raises FloatingPointError naming the epoch, and leaves the last good
    epoch's checkpoint and metrics as they were (a resume starts from sound weights)."""
    cfg = TrainConfig(data_dir=cifar10, **{**DATA, "batch_size": 16, "eval_subset": 10}, train_subset=32, epochs=2,
                      output=str(tmp_path / "run"))
    trainer = GraphTrainer(Graph([Node("resnet20")], [[T]]), cfg)
    loss_fn, per_epoch = trainer.loss_fn, len(trainer.train_loader)

    def diverging(logits, labels, progress):
        losses = loss_fn(logits, labels, progress=progress)
        return losses * float("nan") if trainer.iteration > per_epoch else losses  # epoch 2 diverges

    trainer.loss_fn = diverging
    with pytest.raises(FloatingPointError, match="epoch 2: the training loss is not finite"):
        trainer.fit()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=False)
    assert state["epoch"] == 1 and len(read_metrics(tmp_path / "run")) == 1
    assert all(torch.isfinite(v).all() for v in state["models"][0].values() if v.is_floating_point())


def test_cli_reports_a_diverged_run_in_one_line(tmp_path, cifar10, capsys):
    code = train_dcl.main(["--node-models", "resnet20", "--dataset", "cifar10", "--data-dir", cifar10, "--lr", "1e30",
                           "--epochs", "1", "--train-subset", "32", "--eval-subset", "10", "--batch-size", "16",
                           "--workers", "0", "--no-progress", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("train_dcl.py: error: epoch 1: the training loss is not finite") and "\n" not in err


# ------------------------------------------------------------------------------ README flags that reach the trainer

CLI_DATA = ["--dataset", "cifar10", "--train-subset", "16", "--eval-subset", "10", "--batch-size", "16",
            "--workers", "0", "--no-progress", "--epochs", "1"]


@pytest.fixture
def built(monkeypatch):
    """train_dcl.main builds its trainer but does not train: the built trainer is returned for inspection."""
    trainers = []

    def fit(self, epoch_callback=None):
        trainers.append(self)
        return TrainResult()

    monkeypatch.setattr(GraphTrainer, "fit", fit)
    return trainers


def _dropout_active(model: torch.nn.Module) -> bool:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    model.eval()
    return not torch.equal(a, b)


def test_model_kwargs_reach_the_built_models(tmp_path, cifar10, built):
    code = train_dcl.main(["--node-models", "resnet20,resnet20,wrn16_2", "--model-kwargs", "all:drop_rate=0.25",
                           "--model-kwargs", "0:zero_init_last=False", "--data-dir", cifar10, *CLI_DATA,
                           "--output", str(tmp_path / "run")])
    assert code == 0
    (trainer,) = built
    models = [n.raw for n in trainer.nodes]
    assert all(_dropout_active(m) for m in models)  # all: every node got drop_rate
    assert not _dropout_active(__import__("timm").create_model("resnet20", num_classes=10))  # BN alone: deterministic
    drops = [m for m in models[2].modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(d.p == 0.25 for d in drops)
    # 0: only node 0 starts with its residual branches' last BN at 1 (the default zeroes it)
    last_bn = [torch.cat([b.bn2.weight.detach().cpu() for s in m.stages for b in s]) for m in models[:2]]
    assert torch.all(last_bn[0] == 1) and torch.all(last_bn[1] == 0)


def test_pretrained_dir_repoints_frozen_nodes(tmp_path, cifar10, teacher, built, capsys):
    """Graph transfer: a graph naming a teacher trained elsewhere gets DIR/<dataset>/<model>.pth."""
    graph = Graph([Node("resnet20"), Node("resnet20", checkpoint="trained/on/cifar100/resnet20.pth")],
                  [[T, T], [C, C]])
    graph_file = graph.save(tmp_path / "best_graph.json")
    pretrained = tmp_path / "pretrained"
    (pretrained / "cifar10").mkdir(parents=True)
    shutil.copy(teacher, pretrained / "cifar10" / "resnet20.pth")
    args = ["--graph", str(graph_file), "--data-dir", cifar10, *CLI_DATA, "--output", str(tmp_path / "run")]
    assert train_dcl.main([*args, "--pretrained-dir", str(pretrained)]) == 0
    (trainer,) = built
    node = trainer.nodes[1]
    assert node.frozen and Path(trainer.graph.nodes[1].checkpoint) == (pretrained / "cifar10" / "resnet20.pth").resolve()
    state, ckpt = node.raw.state_dict(), _weights(teacher)
    assert all(torch.equal(state[k].cpu(), ckpt[k]) for k in ckpt)
    # without a teacher for this data set: one error line naming the file it looked for
    capsys.readouterr()
    assert train_dcl.main([*args, "--pretrained-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "train_dcl.py: error:" in err and str(tmp_path / "empty" / "cifar10" / "resnet20.pth") in err


def test_temperature_flag_overrides_the_graph_files(tmp_path, cifar10, built):
    from timm_dcl import ktg_loss_reference

    graph = Graph.preset("dml", ["resnet20", "resnet20"])
    assert graph.temperature == 1.0
    graph_file = graph.save(tmp_path / "graph.json")
    assert train_dcl.main(["--graph", str(graph_file), "--temperature", "4", "--data-dir", cifar10, *CLI_DATA,
                           "--output", str(tmp_path / "run")]) == 0
    (trainer,) = built
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 8, 10, generator=gen) * 3, torch.randint(0, 10, (8,), generator=gen)
    got = trainer.loss_fn(logits, labels, progress=1.0)
    torch.testing.assert_close(got, ktg_loss_reference(logits, labels, graph.gates, temperature=4.0))
    assert not torch.allclose(got, ktg_loss_reference(logits, labels, graph.gates, temperature=1.0))
