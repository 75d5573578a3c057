"""End-to-end training on real CIFAR-10 images: outputs, resume, KD, DDP, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_dcl
from conftest import read_metrics
from timm_dcl.trainer import lr_at_epoch
from timm_dcl.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-subset", "120", "--eval-subset", "60", "--batch-size", "32", "--no-progress",
        "--workers", "0", "--seed", "3"]


def _run(tmp: Path, name: str, *args: str) -> Path:
    out = tmp / name
    code = train_dcl.main([*args, "--output", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, cifar10) -> Path:
    """A 2-node DML graph trained for two straight epochs (shared by several tests)."""
    tmp = tmp_path_factory.mktemp("straight")
    return _run(tmp, "run", "--node-models", "resnet20,resnet20", "--dataset", "cifar10", "--data-dir", cifar10,
                "--epochs", "2", *TINY)


def test_outputs_of_a_real_run(two_epochs):
    out = two_epochs
    for name in ("graph.json", "graph.png", "graph.svg", "config.json", "metrics.jsonl", "metrics.csv",
                 "curves.png", "summary.json", "checkpoints/last.pth", "checkpoints/best.pth",
                 "nodes/node0_resnet20.pth", "nodes/node1_resnet20.pth"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r) >= {"epoch", "top1", "ensemble_top1", "train_loss", "lr", "time"}
        assert len(r["top1"]) == len(r["train_loss"]) == len(r["lr"]) == 2
        assert all(0.0 <= t <= 100.0 for t in r["top1"]) and 0.0 <= r["ensemble_top1"] <= 100.0
        assert all(v > 0 and v == v for v in r["train_loss"])
    # 60 test images: every accuracy is a multiple of 1/60.
    assert all(abs(t * 60 / 100 - round(t * 60 / 100)) < 1e-9 for t in records[-1]["top1"])
    # the other outputs agree with metrics.jsonl
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_top1"] == records[-1]["top1"] and summary["epochs"] == 2
    assert summary["final_ensemble_top1"] == records[-1]["ensemble_top1"]
    assert summary["best_top1"] == [max(r["top1"][i] for r in records) for i in range(2)]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["epoch", "top1_0", "top1_1", "ensemble_top1"] and len(rows) == 3
    assert [float(v) for v in rows[2].split(",")[1:4]] == [*records[1]["top1"], records[1]["ensemble_top1"]]
    last = torch.load(out / "checkpoints" / "last.pth", weights_only=False)
    best = torch.load(out / "checkpoints" / "best.pth", weights_only=False)
    assert last["epoch"] == 2 and last["history"] == records
    best_epoch = max(records, key=lambda r: r["top1"][0])["epoch"]  # the first epoch of node 0's best
    assert best["epoch"] == best["best"]["epoch"] == best_epoch
    for i in range(2):  # the node files are the final weights
        node = torch.load(out / f"nodes/node{i}_resnet20.pth", weights_only=True)
        assert node["top1"] == records[-1]["top1"][i]
        assert all(torch.equal(node["state_dict"][k], v) for k, v in last["models"][i].items())
    graph = json.loads((out / "graph.json").read_text())
    assert [n["model"] for n in graph["nodes"]] == ["resnet20", "resnet20"]
    assert graph["gates"] == [["through", "through"], ["through", "through"]]


def test_resume_is_bit_identical(tmp_path, two_epochs, cifar10):
    common = ["--node-models", "resnet20,resnet20", "--dataset", "cifar10", "--data-dir", cifar10, *TINY]
    out = _run(tmp_path, "run", *common, "--epochs", "1")
    assert len(read_metrics(out)) == 1
    assert train_dcl.main(["--resume", str(out), "--epochs", "2", *TINY]) == 0
    resumed, straight = read_metrics(out), read_metrics(two_epochs)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(straight)
    for i in range(2):
        a = torch.load(out / f"nodes/node{i}_resnet20.pth", weights_only=True)["state_dict"]
        b = torch.load(two_epochs / f"nodes/node{i}_resnet20.pth", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_rejects_another_graph(tmp_path, two_epochs, cifar10, capsys):
    code = train_dcl.main(["--resume", str(two_epochs), "--node-models", "resnet20,resnet32", "--epochs", "3",
                           "--dataset", "cifar10", "--data-dir", cifar10, "--output", str(tmp_path / "x"), *TINY])
    assert code == 2
    assert "different graph" in capsys.readouterr().err


def test_kd_with_a_frozen_teacher(tmp_path, two_epochs, cifar10):
    teacher = two_epochs / "nodes" / "node1_resnet20.pth"
    before = torch.load(teacher, weights_only=True)["state_dict"]
    out = _run(tmp_path, "kd", "--node-models", "resnet20,resnet20", "--preset", "kd", "--checkpoints",
               f",{teacher}", "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "1", *TINY)
    graph = json.loads((out / "graph.json").read_text())
    assert graph["temperature"] == 2.0 and graph["nodes"][1]["frozen"] is True
    assert not (out / "nodes" / "node1_resnet20.pth").exists()  # frozen nodes are not re-saved
    record = read_metrics(out)[0]
    assert record["train_loss"][1] == 0.0 and record["lr"][1] == 0.0
    # The teacher's test accuracy equals the one it had when it was saved (eval mode, no updates).
    teacher_top1 = torch.load(teacher, weights_only=True)["top1"]
    assert record["top1"][1] == pytest.approx(teacher_top1)
    # training never writes into a frozen teacher's file (its in-memory state: test_promises.py)
    after = torch.load(teacher, weights_only=True)["state_dict"]
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("args, message", [
    (["--node-models", "resnet32x,resnet20"], "resnet32"),                          # close matches listed
    (["--node-models", "resnet20,resnet20", "--gates", "through;through"], "row"),  # not M×M
    (["--node-models", "resnet20,resnet20", "--gates", "through,thru;through,through"], "thru"),
    (["--node-models", "resnet20,resnet20", "--gates", "through,through;cutoff,cutoff"], "cutoff"),
    (["--node-models", "resnet20", "--checkpoints", "a.pth,b.pth"], "slots"),
    (["--node-models", "resnet20", "--model-kwargs", "3:depth=2"], "node 3"),
])
def test_bad_input_is_rejected_before_training(args, message, tmp_path, cifar10, capsys):
    code = train_dcl.main([*args, "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "1",
                           "--output", str(tmp_path / "bad"), *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


@pytest.mark.parametrize("teacher_model, classes, message", [
    ("resnet32", 10, "resnet32"),  # another architecture
    ("resnet20", 100, "100 classes"),  # another class count
])
def test_checkpoint_that_does_not_fit(tmp_path, cifar10, capsys, teacher_model, classes, message):
    import timm

    from timm_dcl.checkpoint import save_node_weights

    path = tmp_path / "teacher.pth"
    save_node_weights(path, timm.create_model(teacher_model, num_classes=classes), model_name=teacher_model,
                      model_kwargs={}, num_classes=classes, dataset="cifar10")
    code = train_dcl.main(["--node-models", "resnet20,resnet20", "--preset", "kd", "--checkpoints", f",{path}",
                           "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "1",
                           "--output", str(tmp_path / "bad"), *TINY])
    assert code == 2
    assert message in capsys.readouterr().err


def test_learning_rate_schedule_matches_the_paper():
    cfg = TrainConfig(epochs=200)
    assert cfg.milestones == [60, 120, 180]
    assert [lr_at_epoch(cfg, e) for e in (0, 59, 60, 119, 120, 180, 199)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001])
    cos = TrainConfig(epochs=10, sched="cosine")
    assert lr_at_epoch(cos, 0) == pytest.approx(0.1) and lr_at_epoch(cos, 5) == pytest.approx(0.05)


@pytest.mark.parametrize("feature_gates", [None, "cutoff,through;linear,cutoff"], ids=["logits", "feature-edges"])
def test_two_process_ddp_keeps_nodes_in_sync(tmp_path, cifar10, feature_gates):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO_ROOT / "tests" / "ddp_worker.py"), "--data-dir", cifar10, "--output", str(tmp_path)]
    if feature_gates:
        cmd += ["--feature-gates", feature_gates]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    states = [s["nodes"] for s in saved]
    assert len(states[0]) == 2  # both nodes
    for node_a, node_b in zip(*states):
        assert node_a.keys() == node_b.keys()
        for k in node_a:
            assert torch.equal(node_a[k], node_b[k]), k
    # The two ranks trained on disjoint halves of the training split, together all of it (128 = 2 × 64),
    # each image once: the rows of the images each rank's trainer actually took, in the order the
    # loader announced for the epoch.
    trained = [s["trained_rows"].tolist() for s in saved]
    assert [len(t) for t in trained] == [64, 64] and all(len(set(t)) == 64 for t in trained)
    assert not set(trained[0]) & set(trained[1])
    assert set(trained[0]) | set(trained[1]) == set(saved[0]["train_rows"].tolist())
    assert [s["rows"].tolist() for s in saved] == trained
    # Each rank has its own RNG stream (seed + rank: dropout and drop-path differ), saved for the resume.
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=False)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    records = read_metrics(tmp_path / "run")
    assert len(records) == 1
    if feature_gates:  # the feature edges trained (and DDP averaged their gradients: the states above agree)
        assert records[0]["feature_loss"][0] > 0 and records[0]["feature_loss"][1] > 0


@pytest.mark.parametrize("model", ["resnet20", "resnet32"])
def test_dml_at_the_papers_lr_does_not_blow_up(cifar10, model):
    """Two CIFAR ResNets in mutual learning, SGD at lr 0.1 from the first step (SPEC §4).

    With the plain He init their logits reached |z| ≈ 100 within five steps and both nodes
    collapsed to uniform predictions (loss ln 10) for epochs; the default zero-initialised
    last BN of each block keeps the start stable.
    """
    import timm

    from timm_dcl import KTGLoss
    from timm_dcl.data import augment_batch, build_data, normalize

    torch.manual_seed(0)
    data = build_data("cifar10", data_dir=cifar10, train_subset=640, eval_subset=10, seed=0, num_workers=0,
                      cache=False)
    nets = [timm.create_model(model, num_classes=10) for _ in range(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4) for n in nets]
    cfg = nets[0].pretrained_cfg
    loss_fn = KTGLoss([["through"] * 2] * 2)
    gen = torch.Generator().manual_seed(0)
    peak, losses = 0.0, []
    for _ in range(20):
        idx = torch.randint(0, len(data.train), (64,), generator=gen)
        x = normalize(augment_batch(data.train.images[idx], generator=gen), cfg["mean"], cfg["std"])
        logits = [n(x) for n in nets]
        loss = loss_fn(logits, data.train.labels[idx])
        loss.sum().backward()
        for o in opts:
            o.step()
            o.zero_grad()
        peak = max(peak, max(float(z.detach().abs().max()) for z in logits))
        losses.append(float(loss.detach().sum()) / 2)
    assert peak < 25, f"logits blew up to |z| = {peak:.1f}"
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1, f"no progress: {losses}"


def test_eval_every_skips_epochs_but_always_the_last(tmp_path, cifar10):
    """--eval-every 2 over 3 epochs evaluates epochs 2 and 3 (the last, always); epoch 1 is
    recorded with top1 null, and every output reads the evaluated epochs only."""
    out = _run(tmp_path, "run", "--node-models", "resnet20", "--dataset", "cifar10", "--data-dir", cifar10,
               "--epochs", "3", "--eval-every", "2", *TINY)
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[0]["top1"] is None and records[0]["ensemble_top1"] is None
    assert all(isinstance(r["top1"][0], float) for r in records[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_top1"] == records[2]["top1"]
    assert summary["best_top1"] == [max(records[1]["top1"][0], records[2]["top1"][0])]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[1].split(",")[1:3] == ["", ""] and rows[3].split(",")[1] == str(records[2]["top1"][0])
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_eval_every_bad_value_is_one_line(value, capsys, cifar10):
    code = train_dcl.main(["--node-models", "resnet20", "--dataset", "cifar10", "--data-dir", cifar10,
                           "--eval-every", value, "--output", "unused", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("train_dcl.py: error:") and "--eval-every" in err[0]
