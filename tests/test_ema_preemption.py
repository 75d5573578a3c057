"""Issue 18: EMA nodes (a mean teacher in the graph) and runs that survive preemption.

The EMA node's logits are held to a separately kept timm ``ModelEmaV3`` of its network; the
preemption tests send a real SIGTERM to this process in the middle of an epoch (at a chosen
step, through a wrapper of the step's last hook) and hold the resumed run to the uninterrupted
one, weights, EMAs and metrics bit for bit.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import signal
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import search_dcl
import train_dcl
from timm_dcl.cli import graph_from_args
from timm_dcl.config import TrainConfig
from timm_dcl.draw import draw_graph
from timm_dcl.graph import EMA, Graph, Node
from timm_dcl.run_state import load_run_checkpoint
from timm_dcl.search.space import EMA_SOURCE, SearchSpace, canonical_graph
from timm_dcl.trainer import GraphTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# 64 images in batches of 16: four steps an epoch
TINY = ["--train-subset", "64", "--eval-subset", "32", "--batch-size", "16", "--workers", "0", "--no-progress",
        "--seed", "3"]
MEAN_TEACHER = ["--node-models", "resnet20,ema:0", "--gates", "through,through;cutoff,cutoff",
                "--model-kwargs", "0:depth=8"]


def data_args(cifar10: str) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", cifar10]


def one_line(err: str, prog: str = "train_dcl.py") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ the graph


def test_an_ema_graph_round_trips_through_json_and_draws(tmp_path):
    g = Graph([Node("resnet20"), Node("resnet20"), Node(EMA, of=0)],
              [["through", "through", "through"], ["through", "through", "cutoff"], ["cutoff"] * 3])
    d = g.to_dict()
    assert d["nodes"][2] == {"model": "ema", "model_kwargs": {}, "checkpoint": None, "frozen": False, "of": 0}
    back = Graph.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d and back.nodes[2].is_ema and back.ema_source(2) == 0
    assert back.ema_nodes == (2,) and back.trainable_nodes == (0, 1)
    # the ensemble of all networks leaves the EMA node out
    assert Graph([Node("resnet20"), Node(EMA, of=0), Node("ensemble")],
                 [["through"] * 3, ["cutoff"] * 3, ["cutoff"] * 3]).ensemble_members(2) == (0,)
    assert "EMA of node 0" in g.describe()
    for suffix in (".png", ".svg"):
        path = draw_graph(g, tmp_path / f"g{suffix}")
        assert path.stat().st_size > 1000


@pytest.mark.parametrize("gates, nodes, message", [
    ("through,through;through,cutoff", "resnet20,ema:0", "node 1 is the EMA of node 0 (it learns nothing), so its "
                                                         "gate row must be all cutoff"),
    ("through,through;cutoff,cutoff", "resnet20,ema:1", "nodes[1].of: node 1 (ema) is virtual, not a trainable node"),
    ("through,through;cutoff,cutoff", "resnet20,ema:5", "nodes[1].of: node 5 is out of range"),
    ("through,through,through;cutoff,cutoff,cutoff;cutoff,cutoff,cutoff", "resnet20,ensemble,ema:1",
     "nodes[2].of: node 1 (ensemble) is virtual"),
    ("through,through;cutoff,cutoff", "resnet20,ema:x", "--node-models 'ema:x': expected ema:N"),
])
def test_an_ema_node_that_cannot_be_is_one_line(gates, nodes, message, capsys, tmp_path):
    assert train_dcl.main(["--node-models", nodes, "--gates", gates, "--output", str(tmp_path / "r")]) == 2
    assert message in one_line(capsys.readouterr().err)


def test_an_ema_of_a_frozen_node_is_refused(tmp_path):
    ckpt = tmp_path / "t.pth"
    ckpt.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"nodes\[2\]\.of: node 1 \(resnet20\) is frozen, not a trainable node"):
        Graph([Node("resnet20"), Node("resnet20", checkpoint=str(ckpt)), Node(EMA, of=1)],
              [["through"] * 3, ["cutoff"] * 3, ["cutoff"] * 3])


@pytest.mark.parametrize("flag, value, message", [
    ("--model-ema-decay", "1.0", "--model-ema-decay must be a number in [0, 1), got 1.0"),
    ("--model-ema-decay", "-0.1", "--model-ema-decay must be a number in [0, 1)"),
    ("--model-ema-decay", "x", "argument --model-ema-decay: invalid float value: 'x'"),
    ("--checkpoint-every-steps", "0", "--checkpoint-every-steps must be an integer ≥ 1, got 0"),
    ("--checkpoint-every-steps", "1.5", "argument --checkpoint-every-steps: invalid int value: '1.5'"),
])
def test_bad_flag_values_are_one_line(flag, value, message, capsys, tmp_path):
    assert train_dcl.main([*MEAN_TEACHER, flag, value, "--output", str(tmp_path / "r")]) == 2
    assert message in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------ training


def test_an_ema_node_teaches_with_the_logits_of_a_separately_kept_model_ema(cifar10, monkeypatch):
    """Every step, the EMA node's logits equal a timm ModelEmaV3 of node 0 kept here, beside the trainer,
    evaluated on the same batch; and they reach node 0 through its open edge."""
    from timm.utils import ModelEmaV3

    args, _ = train_dcl.parse_args([*MEAN_TEACHER, *data_args(cifar10), *TINY, "--epochs", "2",
                                    "--model-ema-decay", "0.8", "--model-ema-warmup"])
    cfg = TrainConfig.from_args(args)
    trainer = GraphTrainer(graph_from_args(args), cfg)
    node = trainer.nodes[0]
    ours = ModelEmaV3(copy.deepcopy(node.raw), decay=0.8, use_warmup=True)
    seen = []
    inputs_of, loss_fn, update = trainer._inputs, trainer.loss_fn, trainer._update_emas

    def capture_inputs(images):
        seen.append(inputs_of(images))
        return seen[-1]

    def check_logits(logits, labels, progress):
        x = seen[-1][node.norm_key]
        with torch.no_grad():
            expected = ours.module(x)
        assert torch.equal(logits[1], expected)
        assert not logits[1].requires_grad
        checked.append(trainer.iteration)
        return loss_fn(logits, labels, progress=progress)

    def update_both():
        update()
        ours.update(node.raw, step=trainer.iteration)

    checked: list = []
    monkeypatch.setattr(trainer, "_inputs", capture_inputs)
    monkeypatch.setattr(trainer, "loss_fn", check_logits)
    monkeypatch.setattr(trainer, "_update_emas", update_both)
    result = trainer.fit()
    assert checked == list(range(1, 9))  # every step of both epochs
    ema = trainer.emas.module(0).state_dict()
    assert all(torch.equal(v, ours.module.state_dict()[k]) for k, v in ema.items())
    assert not all(torch.equal(v, node.raw.state_dict()[k]) for k, v in ema.items())  # it is an average
    record = result.history[-1]
    assert record["edge_loss"][0][1] is not None and record["edge_loss"][0][1] > 0  # the open edge 1 → 0
    # the EMA node's top-1 is its network's EMA's top-1: the same model on the same images
    assert record["top1"][1] == record["top1_ema"][0] and record["top1_ema"][1] is None


def test_model_ema_reports_top1_ema_and_writes_the_ema_weights(cifar10, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_dcl.main(["--node-models", "resnet20,resnet20", "--model-kwargs", "all:depth=8",
                           *data_args(cifar10), *TINY, "--epochs", "1", "--model-ema", "--model-ema-decay", "0.5",
                           "--output", str(out)]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(record["top1_ema"]) == 2 and all(0 <= v <= 100 for v in record["top1_ema"])
    state = load_run_checkpoint(out / "checkpoints" / "last.pth")
    for i in (0, 1):
        node = torch.load(out / "nodes" / f"node{i}_resnet20.pth", weights_only=True)
        ema = node["state_dict_ema"]
        assert ema.keys() == node["state_dict"].keys()
        assert all(torch.equal(ema[k], state["ema"][i][f"module.{k}"]) for k in ema)
    # config.yaml round-trips the new flags
    args, _ = train_dcl.parse_args(["--config", str(out / "config.yaml"), "--output", str(tmp_path / "again")])
    assert (args.model_ema, args.model_ema_decay, args.model_ema_warmup, args.checkpoint_every_steps) == \
        (True, 0.5, False, None)
    args, _ = train_dcl.parse_args(["--config", str(out / "config.yaml"), "--model-ema-warmup",
                                    "--checkpoint-every-steps", "3"])
    assert args.model_ema_warmup and args.checkpoint_every_steps == 3


def test_checkpoint_every_steps_writes_last_mid_epoch(cifar10, tmp_path, monkeypatch):
    saved = []
    save = GraphTrainer._save_state

    def spy(self, which, rng, position=None):
        saved.append((which, self.iteration, None if position is None else position["step"]))
        return save(self, which, rng, position)

    monkeypatch.setattr(GraphTrainer, "_save_state", spy)
    out = tmp_path / "run"
    assert train_dcl.main([*MEAN_TEACHER, *data_args(cifar10), *TINY, "--epochs", "2",
                           "--checkpoint-every-steps", "3", "--output", str(out)]) == 0
    # every 3rd step, except where the epoch's end writes it anyway (iteration 4 and 8 are epoch ends)
    assert [s for s in saved if s[0] == "last"] == [("last", 3, 3), ("last", 4, None), ("last", 6, 2),
                                                    ("last", 8, None)]
    args, _ = train_dcl.parse_args(["--config", str(out / "config.yaml")])
    assert args.checkpoint_every_steps == 3


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cifar10) -> Path:
    """The uninterrupted run of a mean teacher with --model-ema: two epochs of four steps."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIMM_DCL_CACHE", str(out.parent / "cache"))
        assert train_dcl.main([*MEAN_TEACHER, *data_args(cifar10), *TINY, "--epochs", "2", "--model-ema",
                               "--model-ema-decay", "0.7", "--output", str(out)]) == 0
    return out


def _sigterm_at(monkeypatch, iteration: int, sig=signal.SIGTERM) -> None:
    """A real signal to this process right after the optimiser step of ``iteration`` (run-wide count)."""
    update = GraphTrainer._update_emas

    def update_then_signal(self):
        update(self)
        if self.iteration == iteration:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(GraphTrainer, "_update_emas", update_then_signal)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig, iteration", [(signal.SIGTERM, 6), (signal.SIGUSR1, 3)], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_mid_epoch_then_resume_ends_as_the_uninterrupted_run(sig, iteration, straight, cifar10,
                                                                           tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _sigterm_at(monkeypatch, iteration, sig)
    assert train_dcl.main([*MEAN_TEACHER, *data_args(cifar10), *TINY, "--epochs", "2", "--model-ema",
                           "--model-ema-decay", "0.7", "--output", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "stopped by" in line]
    epoch, step = (iteration - 1) // 4 + 1, (iteration - 1) % 4 + 1
    assert lines == [f"train_dcl.py: stopped by {signal.Signals(sig).name} at epoch {epoch}, step {step} of 4: "
                     f"checkpoints/last.pth written; continue with --resume {out}"]
    print(lines[0])  # the line a cluster's log shows (pytest -s)
    state = load_run_checkpoint(out / "checkpoints" / "last.pth")
    assert state["position"]["step"] == step and state["iteration"] == iteration
    assert not (out / "nodes").exists()  # the run did not finish
    monkeypatch.undo()
    monkeypatch.setenv("TIMM_DCL_CACHE", str(tmp_path / "cache"))
    assert train_dcl.main(["--resume", str(out)]) == 0
    assert f"resume: epoch {epoch} continues at step {step + 1} of 4" in capsys.readouterr().out
    assert _metrics(out) == _metrics(straight)
    ours = torch.load(out / "nodes" / "node0_resnet20.pth", weights_only=True)
    theirs = torch.load(straight / "nodes" / "node0_resnet20.pth", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert ours[key].keys() == theirs[key].keys()
        assert all(torch.equal(ours[key][k], theirs[key][k]) for k in ours[key]), key
    a, b = (load_run_checkpoint(r / "checkpoints" / "last.pth") for r in (out, straight))
    assert a["iteration"] == b["iteration"] == 8 and "position" not in a
    assert _same(a["optimizer"], b["optimizer"]) and _same(a["ema"], b["ema"]) and _same(a["rng"], b["rng"])


def _same(x, y) -> bool:
    """Equal, tensors (and numpy arrays of RNG states) bit for bit, through dicts, lists and tuples."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    if hasattr(x, "shape"):  # numpy
        return bool((x == y).all())
    return x == y


def test_the_loader_skips_to_a_batch_without_changing_the_order():
    from timm_dcl.data.memory import ImageData, InMemoryTrainLoader

    data = ImageData(images=torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).view(10, 3, 2, 2),
                     labels=torch.arange(10) % 2, classes=["a", "b"])
    loader = InMemoryTrainLoader(data, 3, augment=None, seed=4)
    loader.set_epoch(2)
    whole = list(loader)
    for start in range(len(loader) + 1):
        skipped = list(loader.iter_from(start))
        assert len(skipped) == len(whole) - start
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(skipped, whole[start:]))


# ------------------------------------------------------------------------------ the search


def search_args(cifar10: str, output: Path, *extra: str) -> list[str]:
    return ["--num-nodes", "2", "--target-model", "resnet20", "--candidates", "resnet20", "--dataset", "cifar10",
            "--data-dir", cifar10, "--train-subset", "60", "--val-size", "20", "--eval-subset", "10",
            "--batch-size", "30", "--workers", "0", "--no-progress", "--poll-interval", "0.2", "--epochs", "1",
            "--heartbeat-interval", "1", "--grace-period", "2", "--output", str(output), "--no-baselines",
            "--sampler-seed", "0", *extra]


def test_a_search_worker_stopped_by_sigterm_loses_no_finished_trial(cifar10, tmp_path, monkeypatch, capsys):
    """SIGTERM in the second trial (its second step): the worker exits 0 with one line, the finished
    trial is kept, the stopped one fails and its graph is queued again; the resumed study trains it."""
    out = tmp_path / "out"
    storage = lambda: optuna.storages.JournalStorage(  # noqa: E731
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    calls = itertools.count(1)
    update = GraphTrainer._update_emas

    def second_trial_only(self):
        update(self)
        if next(calls) == 3:  # the first step of the second trial
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(GraphTrainer, "_update_emas", second_trial_only)
    assert search_dcl.main(search_args(cifar10, out, "--n-trials", "3")) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "stopped by" in x]
    assert len(line) == 1 and "stopped by SIGTERM at epoch 1, step 1 of 2" in line[0]
    assert "run the same command again to resume the study" in line[0]
    study = optuna.load_study(study_name="ktg-cifar10-2nodes", storage=storage())
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["preempted"] and trials[2].user_attrs["requeued_from"] == 1
    assert trials[2].params == {} and trials[1].params  # queued: its parameters are fixed when it runs
    first = (trials[0].value, trials[0].params)
    monkeypatch.undo()
    monkeypatch.setenv("TIMM_DCL_CACHE", str(tmp_path / "cache"))
    assert search_dcl.main(search_args(cifar10, out, "--n-trials", "3")) == 0
    study = optuna.load_study(study_name="ktg-cifar10-2nodes", storage=storage())
    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and (trials[0].value, trials[0].params) == first
    assert trials[2].state == TrialState.COMPLETE and trials[2].params == trials[1].params


def test_the_search_space_draws_ema_sources():
    space = SearchSpace(3, "resnet20", ("resnet20",), "cifar10", ema_sources=True)
    assert space.choices == ("resnet20", EMA_SOURCE) and space.settings()["ema_sources"] is True
    gates = [["through"] * 3, ["through"] * 3, ["correct", "linear", "through"]]
    graph = space.build(["resnet20", EMA_SOURCE], gates)
    assert graph.nodes[2].is_ema and graph.ema_source(2) == 0 and graph.gates[2] == ["cutoff"] * 3
    # its drawn row trains nothing: graphs that differ only there are one graph
    a = canonical_graph(["resnet20", "resnet20", EMA_SOURCE], gates)
    b = canonical_graph(["resnet20", EMA_SOURCE, "resnet20"],
                        [["through"] * 3, ["linear", "through", "through"], ["through"] * 3])
    assert a.key == b.key == "resnet20,ema:0,resnet20|through,through,through;cutoff,cutoff,cutoff;" \
                             "through,through,through"
    canon = space.build_canonical(a)
    assert canon.nodes[1].is_ema and canon.ema_source(1) == 0 and canon.gates[1] == ["cutoff"] * 3

    class Trial:  # draws every model as ema:0
        def suggest_categorical(self, name, choices):
            return choices[-1] if name.startswith("model_") else "through"

    assert [n.model for n in space.sample(Trial()).nodes] == ["resnet20", "ema", "ema"]
    with pytest.raises(ValueError, match="--ema-sources draws the EMA of node 0, which --ensemble-target"):
        SearchSpace(3, None, ("resnet20",), ensemble_target=True, ema_sources=True)
    with pytest.raises(ValueError, match="no --ema-sources"):
        SearchSpace(3, "resnet20", ("resnet20",)).build(["resnet20", EMA_SOURCE], gates)
