"""Bring your own data, weights and recipe: train_dcl.py on image folders, parquet folders with
other columns, a ViT beside a CIFAR ResNet, local timm weight files, warm starts, timm's
optimisers and schedulers, YAML configs, resumes that change the length, trackers, fp16 scaling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_dcl
from conftest import read_metrics
from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph, Node
from timm_dcl.recipe import planned_lrs
from timm_dcl.trainer import GraphTrainer, train_graph

FAST = ["--batch-size", "16", "--no-progress", "--workers", "0", "--seed", "1"]


def _run(out: Path, *args: str) -> Path:
    assert train_dcl.main([*args, "--output", str(out)]) == 0
    return out


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def cifar_teacher(tmp_path_factory, cifar10) -> Path:
    """A resnet20 trained one epoch on 320 CIFAR-10 images: a local weight file with 10 classes."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    _run(out, "--node-models", "resnet20", "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "1",
         "--train-subset", "320", "--eval-subset", "100", *FAST)
    return out / "nodes" / "node0_resnet20.pth"


def test_image_folder_cifar_resnet_and_vit_at_64px(tmp_path, tiny_image_folder):
    # No model kwargs: the ViT gets img_size=64 because its pretrained_cfg says fixed_input_size.
    out = _run(tmp_path / "run", "--node-models", "resnet20,vit_tiny_patch16_224", "--dataset", "folder",
               "--data-dir", str(tiny_image_folder), "--img-size", "64", "--epochs", "1", "--opt", "adamw",
               "--lr", "1e-3", "--weight-decay", "0.05", *FAST)
    record = read_metrics(out)[0]
    assert len(record["top1"]) == 2 and all(0 <= t <= 100 for t in record["top1"])
    assert all(v > 0 for v in record["train_loss"])
    vit = _weights(out / "nodes" / "node1_vit_tiny_patch16_224.pth")
    assert vit["pos_embed"].shape == (1, (64 // 16) ** 2 + 1, 192)  # built for 64 px, not 224
    assert vit["head.weight"].shape[0] == 10  # the folder's 10 classes
    # the validation folder ("val") is the evaluation split: 30 images, so top-1 in steps of 1/30
    assert all(abs(t * 30 / 100 - round(t * 30 / 100)) < 1e-9 for t in record["top1"])


def test_parquet_other_columns_streaming_adamw_warmup_cosine_and_yaml_round_trip(tmp_path, tiny_parquet_renamed):
    args = ["--node-models", "resnet20,resnet20", "--dataset", "parquet", "--data-dir", str(tiny_parquet_renamed),
            "--image-column", "picture", "--label-column", "category", "--img-size", "32", "--in-memory", "no",
            "--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "1",
            "--warmup-lr", "1e-4", "--min-lr", "1e-5", "--node-lr", "1:5e-4", "--epochs", "3", *FAST]
    out = _run(tmp_path / "run", *args)
    records = read_metrics(out)
    cfg = TrainConfig(epochs=3, opt="adamw", lr=2e-3, sched="cosine", warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5)
    expected = planned_lrs(cfg, base_lrs=[2e-3, 5e-4])
    # the lr each node's optimiser held, epoch by epoch: warm-up, then cosine, node 1 on its own lr
    assert [lr for r in records for lr in r["lr"]] == pytest.approx([lr for row in expected for lr in row])
    assert records[0]["lr"] == pytest.approx([1e-4, 1e-4])
    # the resolved configuration reproduces the run
    saved = (out / "config.yaml").read_text()
    assert "image_column: picture" in saved and "node_lr:" in saved
    again = _run(tmp_path / "again", "--config", str(out / "config.yaml"))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(read_metrics(again)) == strip(records)


def test_local_weight_file_with_a_new_classifier_and_a_warm_start(tmp_path, cifar_teacher, tiny_image_folder):
    import safetensors.torch
    import timm

    import timm_dcl  # noqa: F401  (registers resnet20)
    # A timm weight file for 100 classes (as from timm's hub cache): the body loads, the head is new.
    src = timm.create_model("resnet20", num_classes=100)
    file = tmp_path / "resnet20_c100.safetensors"
    safetensors.torch.save_file(src.state_dict(), str(file))
    graph = Graph([Node("resnet20", pretrained_file=str(file)), Node("resnet20", checkpoint=str(cifar_teacher))],
                  [["through", "through"], ["through", "through"]])
    cfg = TrainConfig(dataset="folder", data_dir=str(tiny_image_folder), img_size=32, epochs=1, batch_size=16,
                      workers=0, progress_bar=False)
    trainer = GraphTrainer(graph, cfg)
    n0, n1 = (n.raw.state_dict() for n in trainer.nodes)
    body = [k for k in n0 if not k.startswith("fc.")]
    assert all(torch.equal(n0[k], src.state_dict()[k]) for k in body)
    assert n0["fc.weight"].shape == (10, 64)
    # the warm start: node 1 begins exactly at its checkpoint (classifier included, 10 = 10 classes)
    ckpt = _weights(cifar_teacher)
    assert all(torch.equal(n1[k], ckpt[k]) for k in ckpt)
    result = trainer.fit()
    assert len(result.history) == 1
    after = trainer.nodes[1].raw.state_dict()
    assert not torch.equal(after["conv1.weight"], ckpt["conv1.weight"])  # ... and then trains


def test_frozen_teacher_from_a_pretrained_file(tmp_path, cifar_teacher, cifar10):
    import safetensors.torch
    state = _weights(cifar_teacher)
    file = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(state, str(file))
    out = _run(tmp_path / "kd", "--node-models", "resnet20,resnet20", "--preset", "kd", "--pretrained-file",
               f"1:{file}", "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "1", "--train-subset", "64",
               "--eval-subset", "100", *FAST)
    graph = json.loads((out / "graph.json").read_text())
    assert graph["nodes"][1]["frozen"] is True and graph["nodes"][1]["pretrained_file"] == str(file)
    record = read_metrics(out)[0]
    assert record["lr"][1] == 0.0 and record["train_loss"][1] == 0.0
    # eval mode, no updates: the teacher scores what it scored when it was saved, on the same images
    assert record["top1"][1] == pytest.approx(torch.load(cifar_teacher, weights_only=True)["top1"])


def test_frozen_node_needs_a_matching_classifier(tmp_path, cifar10, capsys):
    import safetensors.torch
    import timm
    file = tmp_path / "r20_c100.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet20", num_classes=100).state_dict(), str(file))
    code = train_dcl.main(["--node-models", "resnet20,resnet20", "--preset", "kd", "--pretrained-file", f"1:{file}",
                           "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "1", "--train-subset", "32",
                           "--eval-subset", "10", "--output", str(tmp_path / "x"), *FAST])
    assert code == 2
    assert "is frozen, but its weights" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["replan", "keep"])
def test_resume_with_more_epochs(tmp_path, cifar10, capsys, mode):
    common = ["--node-models", "resnet20,resnet20", "--gates", "through,linear;linear,through", "--dataset",
              "cifar10", "--data-dir", cifar10, "--train-subset", "64", "--eval-subset", "20", "--sched", "cosine",
              *FAST]
    out = _run(tmp_path / "run", *common, "--epochs", "2")
    state = torch.load(out / "checkpoints" / "last.pth", weights_only=False)
    k0 = state["iteration"]
    assert state["plan"]["clock"] == {"end_iteration": k0, "start_iteration": 0, "start_progress": 0.0}
    capsys.readouterr()
    assert train_dcl.main(["--resume", str(out), "--epochs", "4", "--resume-schedule", mode]) == 0
    said = capsys.readouterr().out
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    clock = torch.load(out / "checkpoints" / "last.pth", weights_only=False)["plan"]["clock"]
    if mode == "replan":
        assert "re-planned over 4 epochs" in said
        assert [r["lr"][0] for r in records[2:]] == pytest.approx([0.05 * (1 + __import__("math").cos(
            __import__("math").pi * e / 4)) for e in (2, 3)])
        # the linear gates continue from where they stood (1.0 at the old end) instead of jumping back
        assert clock == {"end_iteration": 2 * k0, "start_iteration": k0, "start_progress": 1.0}
    else:
        assert "keeping the original 2-epoch schedule" in said
        assert [r["lr"][0] for r in records[2:]] == [0.0, 0.0]  # cosine over 2 epochs ended at min_lr
        assert clock == {"end_iteration": k0, "start_iteration": 0, "start_progress": 0.0}


def test_fp16_loss_scale_updates_once_per_iteration(cifar10):
    from accelerate import Accelerator

    # Accelerate keeps no GradScaler on the CPU; give it one so the trainer's step logic runs as on a GPU.
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1)
    graph = Graph.preset("dml", ["resnet20", "resnet20", "resnet20"])
    cfg = TrainConfig(dataset="cifar10", data_dir=cifar10, train_subset=48, eval_subset=10, batch_size=16, epochs=1,
                      workers=0, progress_bar=False)
    trainer = GraphTrainer(graph, cfg, accelerator=acc)
    trainer.fit()
    assert trainer.iteration == 3
    # three iterations, three growths: one update per iteration for all three nodes (not nine)
    assert acc.scaler.get_scale() == 2.0 ** 7


def test_log_with_tensorboard(tmp_path, cifar10):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run(tmp_path / "run", "--node-models", "resnet20,resnet20", "--dataset", "cifar10", "--data-dir", cifar10,
               "--epochs", "2", "--train-subset", "32", "--eval-subset", "10", "--log-with", "tensorboard", *FAST)
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"top1/0", "top1/1", "top1/ensemble", "loss/0", "lr/0", "lr/1"} <= tags
    top1 = [e.value for e in acc.Scalars("top1/0")]
    assert top1 == pytest.approx([r["top1"][0] for r in read_metrics(out)])


def test_without_log_with_no_tracker_runs(tmp_path, cifar10):
    out = _run(tmp_path / "run", "--node-models", "resnet20", "--dataset", "cifar10", "--data-dir", cifar10,
               "--epochs", "1", "--train-subset", "16", "--eval-subset", "10", *FAST)
    assert not list(out.rglob("events.out.tfevents.*"))


def test_compile_compiles_the_whole_step_and_matches_eager(cifar10, monkeypatch):
    """--compile: normalisation, both nodes and the loss op as one compiled step, progress as a
    tensor (linear gates change it every step without recompiling); the numbers are eager's.
    The graph capture is what is tested: aot_eager spares the test inductor's C++ build."""
    import functools

    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    graph = Graph([Node("resnet20"), Node("resnet20")], [["through", "linear"], ["linear", "through"]])
    common = dict(dataset="cifar10", data_dir=cifar10, train_subset=64, eval_subset=20, batch_size=16, epochs=2,
                  workers=0, progress_bar=False, seed=2)
    eager = train_graph(graph, TrainConfig(**common))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        trainer = GraphTrainer(graph, TrainConfig(**common, compile=True))
        compiled = trainer.fit()
    assert trainer._train_step is not trainer._forward_loss  # the step, not each model, is compiled
    assert all(n.train_model is n.raw for n in trainer.nodes)
    for a, b in zip(eager.history, compiled.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-5)
        assert a["lr"] == b["lr"]


def test_sched_on_updates_records_each_epochs_first_lr(tmp_path, cifar10):
    out = _run(tmp_path / "run", "--node-models", "resnet20", "--dataset", "cifar10", "--data-dir", cifar10,
               "--train-subset", "64", "--eval-subset", "10", "--epochs", "2", "--sched", "step", "--decay-epochs", "1",
               "--decay-rate", "0.5", "--sched-on-updates", *FAST)
    # 4 updates an epoch: epoch 1 runs at 0.1 from its first step, epoch 2 at 0.05
    assert [r["lr"] for r in read_metrics(out)] == [[0.1], [0.05]]


def test_clip_grad_bounds_every_update(cifar10):
    graph = Graph([Node("resnet20")], [["through"]])
    cfg = TrainConfig(dataset="cifar10", data_dir=cifar10, train_subset=64, eval_subset=10, batch_size=16, epochs=1,
                      workers=0, progress_bar=False, weight_decay=0.0, momentum=0.0, clip_grad=1e-6)
    trainer = GraphTrainer(graph, cfg)
    before = {k: p.detach().clone() for k, p in trainer.nodes[0].raw.named_parameters()}
    trainer.fit()
    moved = sum((p.detach() - before[k]).square().sum() for k, p in trainer.nodes[0].raw.named_parameters()).sqrt()
    # plain SGD, 4 updates of lr 0.1 × a gradient of norm ≤ 1e-6
    assert 0 < float(moved) <= 4 * 0.1 * 1e-6 * 1.001
