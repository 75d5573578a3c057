"""The graph search: space, exact trial count, heartbeats, storages, and real searches on CIFAR-10."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

import search_dcl
import train_dcl
from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph
from timm_dcl.search import (InvalidGraph, JournalHeartbeatStorage, SearchSpace, SearchWorker, StorageError,
                             fail_stale, isolate_worker, make_pruner, make_sampler, open_storage, open_study,
                             retarget_pretrained, rung_epochs)

REPO_ROOT = Path(__file__).resolve().parents[1]
# the tests below ask for trials by hand, outside Study.optimize
pytestmark = [pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # conftest.py
optuna.logging.set_verbosity(optuna.logging.WARNING)




def tiny_args(cifar10: str, output: Path, *extra: str, train: int = 60, val: int = 20) -> list[str]:
    """A search small enough for two CPU cores: 3 resnet20 nodes, two batches, a few validation images."""
    return ["--num-nodes", "3", "--target-model", "resnet20", "--candidates", "resnet20",
            "--dataset", "cifar10", "--data-dir", cifar10, "--train-subset", str(train), "--val-size", str(val),
            "--eval-subset", "10", "--batch-size", str(train // 2), "--workers", "0", "--no-progress",
            "--poll-interval", "0.2", "--output", str(output), *extra]


# a few more images for the in-process search: its values differ in 1 % steps
SEARCH = dict(train=100, val=100)


def load(output: Path, name: str = "ktg-cifar10-3nodes", storage=None) -> optuna.Study:
    storage = storage or JournalHeartbeatStorage(JournalFileBackend(str(output / "study.journal")), 60)
    return optuna.load_study(study_name=name, storage=storage)


def finished(study: optuna.Study) -> list:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ the space


def test_space_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet33'.*resnet32"):
        SearchSpace(3, "resnet32", ("resnet20", "resnet33"), "cifar10")
    with pytest.raises(ValueError, match="--target-model: unknown timm model"):
        SearchSpace(2, "no_such_net", ("resnet20",), "cifar10")
    with pytest.raises(ValueError, match=r"--num-nodes must be ≥ 1, got 0"):
        SearchSpace(0, "resnet20", ("resnet20",), "cifar10")
    with pytest.raises(ValueError, match="lists 'resnet20' twice"):
        SearchSpace(2, "resnet20", ("resnet20", "resnet20"), "cifar10")
    with pytest.raises(ValueError, match="--candidates is empty"):
        SearchSpace(2, "resnet20", (), "cifar10")
    with pytest.raises(ValueError, match="not a directory"):
        SearchSpace(2, "resnet20", ("resnet20",), "cifar10", pretrained_dir=str(tmp_path / "missing"))
    space = SearchSpace(3, "resnet20", ("resnet20", "resnet32"), "cifar10")
    assert space.param_names() == ["model_1", "model_2"] + [f"gate_{t}_{s}" for t in range(3) for s in range(3)]


def test_all_cutoff_rows_become_frozen_only_with_a_checkpoint(tmp_path):
    (tmp_path / "cifar10" / "resnet32" / "nodes").mkdir(parents=True)
    (tmp_path / "cifar10" / "resnet20.pth").write_bytes(b"x")  # existence is what the space checks
    (tmp_path / "cifar10" / "resnet32" / "nodes" / "node0_resnet32.pth").write_bytes(b"x")
    (tmp_path / "cifar100").mkdir()
    cut, thr = "cutoff", "through"
    gates = [[thr, thr, thr], [cut, cut, cut], [thr, cut, cut]]
    space = SearchSpace(3, "resnet20", ("resnet20", "resnet32", "resnet44"), "cifar10", str(tmp_path))
    graph = space.build(["resnet20", "resnet44"], gates)
    assert graph.frozen_nodes == (1,)
    assert graph.nodes[1].checkpoint == str((tmp_path / "cifar10" / "resnet20.pth").resolve())
    # the layout a one-node train_dcl.py run leaves with --output DIR/<dataset>/<model>
    graph = space.build(["resnet32", "resnet44"], gates)
    assert graph.nodes[1].checkpoint.endswith("cifar10/resnet32/nodes/node0_resnet32.pth")
    with pytest.raises(InvalidGraph, match=r"node 1 \(resnet44\).*no resnet44 checkpoint for cifar10"):
        space.build(["resnet44", "resnet20"], gates)
    with pytest.raises(InvalidGraph, match="node 0"):
        space.build(["resnet20", "resnet20"], [[cut] * 3, [thr] * 3, [thr] * 3])
    # checkpoints are per data set: none for cifar100
    other = SearchSpace(3, "resnet20", ("resnet20",), "cifar100", str(tmp_path))
    with pytest.raises(InvalidGraph, match="for cifar100"):
        other.build(["resnet20", "resnet20"], gates)
    assert SearchSpace(3, "resnet20", ("resnet20",), "cifar10").build(
        ["resnet20", "resnet20"], [[thr] * 3] * 3).frozen_nodes == ()
    # graph transfer: the frozen teacher of the new data set replaces the searched one
    searched = space.build(["resnet20", "resnet44"], gates)
    with pytest.raises(FileNotFoundError, match=r"node 1 \(resnet20\).*cifar100/resnet20.pth does not exist"):
        retarget_pretrained(searched, tmp_path, "cifar100")
    (tmp_path / "cifar100" / "resnet20.pth").write_bytes(b"x")
    moved = retarget_pretrained(searched, tmp_path, "cifar100")
    assert moved.frozen_nodes == (1,) and moved.nodes[1].checkpoint.endswith("cifar100/resnet20.pth")
    assert moved.gates == searched.gates and moved.nodes[2].checkpoint is None


def test_rungs_and_pruner_settings():
    assert rung_epochs(1, 2, 200) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert rung_epochs(5, 3, 100) == [5, 15, 45]
    pruner = make_pruner()
    assert (pruner._min_resource, pruner._reduction_factor, pruner._min_early_stopping_rate) == (1, 2, 0)
    with pytest.raises(ValueError, match="--reduction-factor"):
        make_pruner(1, 1)
    with pytest.raises(ValueError, match="--min-resource"):
        make_pruner(0, 2)
    assert isinstance(make_sampler("random", 0), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("tpe", 0), optuna.samplers.TPESampler)
    with pytest.raises(ValueError, match="--sampler"):
        make_sampler("grid")


def test_isolate_worker_makes_independent_workers():
    env = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h",
           "MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": "4,5", "ACCELERATE_MIXED_PRECISION": "bf16"}
    info = isolate_worker(env, num_gpus=2)
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (3, 3, 4, False)
    # no process group left for accelerate to join; GPU 3 mod 2 of the visible ones
    assert env == {"CUDA_VISIBLE_DEVICES": "4,5", "ACCELERATE_MIXED_PRECISION": "bf16",
                   "ACCELERATE_TORCH_DEVICE": "cuda:1"}
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "1"}
    assert isolate_worker(env, num_gpus=0).is_main and env == {"ACCELERATE_USE_CPU": "1"}
    env = {"PATH": "/bin"}
    assert isolate_worker(env).world_size == 1 and env == {"PATH": "/bin"}


# ------------------------------------------------------------------------- storage and study


def test_unreachable_or_bad_storage_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match=r"cannot open the study storage postgresql://u:\*\*\*@127\.0\.0\.1:1/db"):
        open_storage("postgresql://u:secret@127.0.0.1:1/db", tmp_path / "x.journal")
    with pytest.raises(StorageError, match="nosuchdb"):
        open_storage("nosuchdb://somewhere/x", tmp_path / "x.journal")
    with pytest.raises(StorageError, match="is a directory"):
        open_storage(str(tmp_path), tmp_path / "x.journal")


def test_resume_with_other_settings_is_refused(tmp_path):
    storage = open_storage(None, tmp_path / "s.journal")
    open_study(storage, "s", {"epochs": 2, "num_nodes": 3})
    assert open_study(storage, "s", {"num_nodes": 3, "epochs": 2}).study_name == "s"
    with pytest.raises(ValueError, match=r"epochs: 2 in the study, 3 now"):
        open_study(storage, "s", {"epochs": 3, "num_nodes": 3})


def test_admission_keeps_the_count_exact(tmp_path):
    storage = open_storage(None, tmp_path / "s.journal")
    study = open_study(storage, "s", {})
    space = SearchSpace(1, "resnet20", (), "cifar10")
    cfg = TrainConfig(dataset="cifar10", epochs=1, val_size=10)
    worker = SearchWorker(study, storage, space, cfg, data=None, n_trials=2)
    a, b, c = study.ask(), study.ask(), study.ask()
    assert worker._admitted(a) and worker._admitted(b)
    assert not worker._admitted(c)  # two running trials ahead of it hold both slots
    study.tell(a, state=TrialState.FAIL)  # a slot freed: failed trials never count
    assert worker._admitted(c)
    study.tell(b, 50.0)
    study.tell(c, state=TrialState.FAIL)
    d = study.ask()
    assert worker._admitted(d)
    study.tell(d, 60.0)
    assert not worker._admitted(study.ask())  # two finished: the study is full


def test_stale_trials_of_the_journal_are_failed(tmp_path):
    storage = open_storage(None, tmp_path / "s.journal", heartbeat_interval=1, grace_period=1)
    study = open_study(storage, "s", {})
    dead, alive = study.ask(), study.ask()
    storage.record_beat(dead._trial_id)
    time.sleep(1.6)
    storage.record_beat(alive._trial_id)
    assert fail_stale(study, storage) == [dead.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {dead.number: TrialState.FAIL, alive.number: TrialState.RUNNING}


def test_stale_trials_of_an_rdb_storage_are_failed_by_optimize(tmp_path, monkeypatch):
    """RDB storages keep their own heartbeat; Study.optimize fails a dead worker's trial and the slot is reused."""
    def fake_train(self, trial, graph):
        trial.report(50.0, 1)
        return 50.0

    monkeypatch.setattr(SearchWorker, "_train", fake_train)
    storage = open_storage(f"sqlite:///{tmp_path}/db/s.db", tmp_path / "unused.journal", heartbeat_interval=1,
                           grace_period=1)
    study = open_study(storage, "s", {})
    with pytest.warns(UserWarning, match="Heartbeat of storage"):
        dead = study.ask()  # a worker that died mid-trial
    storage.record_heartbeat(dead._trial_id)
    time.sleep(1.6)
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    cfg = TrainConfig(dataset="cifar10", epochs=1, val_size=10)
    worker = threading.Thread(target=SearchWorker(study, storage, space, cfg, None, n_trials=1, say=lambda m: None,
                                                  poll_interval=0.1).run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the worker waits for the dead trial's slot forever"
    first, *rest = study.get_trials()
    assert first.state == TrialState.FAIL  # failed as stale, and its slot went to a new trial
    assert [t.state for t in rest if "invalid" not in t.user_attrs] == [TrialState.COMPLETE]


def test_racing_workers_finish_exactly_n_trials(tmp_path, monkeypatch):
    """Three workers (threads, each with its own storage handle, as processes have) and a stand-in
    for the trainer that takes a few milliseconds: the study still ends at exactly 10 trials."""
    def fake_train(self, trial, graph):
        for epoch in (1, 2):
            time.sleep(0.003 * (trial.number % 4))
            trial.report(float(trial.number % 7), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(trial.number % 7)

    monkeypatch.setattr(SearchWorker, "_train", fake_train)
    path = tmp_path / "race.journal"
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    cfg = TrainConfig(dataset="cifar10", epochs=2, val_size=10)
    runs, errors = [], []

    def work(seed):
        try:
            storage = open_storage(str(path), path)
            study = open_study(storage, "race", {}, sampler=make_sampler("random", seed), pruner=make_pruner())
            runs.append(SearchWorker(study, storage, space, cfg, None, n_trials=10, poll_interval=0.01,
                                     say=lambda m: None).run())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    study = load(tmp_path, "race", open_storage(str(path), path))
    trials = study.get_trials()
    assert len(finished(study)) == 10
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # whatever is neither finished nor a surplus reservation was an invalid sample (rejected)
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("surplus") or "invalid" in t.user_attrs
    assert sum(runs) == 10  # every trial a worker trained counted
    assert any(t.state == TrialState.PRUNED for t in trials)  # ASHA ran: the worst at epoch 1 were stopped


def test_a_graph_that_cannot_train_fails_alone_but_a_bug_stops_the_worker(tmp_path, monkeypatch):
    def fake_train(self, trial, graph):
        if trial.number % 3 == 1:
            raise FloatingPointError("epoch 1: the training loss is not finite")
        trial.report(50.0, 1)
        return 50.0

    monkeypatch.setattr(SearchWorker, "_train", fake_train)
    storage = open_storage(None, tmp_path / "s.journal")
    study = open_study(storage, "s", {}, sampler=make_sampler("random", 0))
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    cfg = TrainConfig(dataset="cifar10", epochs=1, val_size=10)
    lines = []
    SearchWorker(study, storage, space, cfg, None, n_trials=4, say=lines.append).run()
    assert len(finished(study)) == 4
    diverged = [t for t in study.get_trials() if "error" in t.user_attrs]
    assert diverged and all(t.state == TrialState.FAIL and "FloatingPointError" in t.user_attrs["error"]
                            for t in diverged)
    assert any("failed: FloatingPointError" in line for line in lines)

    def buggy_train(self, trial, graph):
        raise KeyError("a bug")

    monkeypatch.setattr(SearchWorker, "_train", buggy_train)
    with pytest.raises(KeyError, match="a bug"):
        SearchWorker(study, storage, space, cfg, None, n_trials=5, say=lines.append).run()
    last = study.get_trials()[-1]
    assert last.state == TrialState.FAIL and "KeyError" in last.user_attrs["error"]


def test_a_sampled_all_cutoff_row_trains_as_a_frozen_teacher(tmp_path, cifar10):
    """The real trainer on a trial whose node 1 drew an all-cutoff row and has a checkpoint."""
    import timm
    import torch

    from timm_dcl.checkpoint import save_node_weights
    from timm_dcl.data import build_data

    torch.manual_seed(0)  # a teacher whose predictions are not one class: its score tells it apart
    teacher = timm.create_model("resnet20", num_classes=10)
    save_node_weights(tmp_path / "pre" / "cifar10" / "resnet20.pth", teacher, model_name="resnet20",
                      model_kwargs={}, num_classes=10, dataset="cifar10")
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10", str(tmp_path / "pre"))
    cfg = TrainConfig(dataset="cifar10", epochs=1, batch_size=30, val_size=20, train_subset=60, workers=0)
    data = build_data("cifar10", data_dir=cifar10, train_subset=60, val_size=20, eval_subset=10, num_workers=0)
    storage = open_storage(None, tmp_path / "s.journal")
    study = open_study(storage, "s", {})
    kd = {"model_1": "resnet20", "gate_0_0": "through", "gate_0_1": "through",
          "gate_1_0": "cutoff", "gate_1_1": "cutoff"}
    study.enqueue_trial(kd)  # fixes what the sampler would draw
    SearchWorker(study, storage, space, cfg, data, n_trials=1, say=lambda m: None).run()
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.params == kd
    assert trial.user_attrs["frozen"] == [1]
    # the frozen teacher scored what its checkpoint scores: loaded, and untouched by training
    mean, std = (torch.tensor(teacher.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        logits = teacher.eval()((data.val.images.float() / 255 - mean) / std)
    expected = (logits.argmax(1) == data.val.labels).float().mean().item() * 100
    assert trial.user_attrs["top1"][1] == pytest.approx(expected, abs=1e-3)


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("extra, message", [
    (["--candidates", "resnet20,nosuchnet"], "unknown timm model 'nosuchnet'"),
    (["--num-nodes", "0"], "--num-nodes must be ≥ 1"),
    (["--val-size", "0"], "--val-size must be ≥ 1"),
    (["--n-trials", "0"], "--n-trials must be ≥ 1"),
    (["--reduction-factor", "1"], "--reduction-factor must be an integer ≥ 2"),
    (["--storage", "postgresql://user:secret@127.0.0.1:1/x"], "cannot open the study storage postgresql://user:***@"),
    (["--report-seeds", "0", "--report"], "--report-seeds must be an integer ≥ 1"),
    (["--data-dir", "/nonexistent/cifar10"], "--dataset cifar10: "),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
])
def test_bad_cli_input(extra, message, tmp_path, cifar10, capsys):
    args = tiny_args(cifar10, tmp_path / "out", "--n-trials", "1", "--epochs", "1")
    assert search_dcl.main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "secret" not in err
    assert err.startswith("search_dcl.py: error: ") and err.count("\n") == 1  # one line, no traceback
    assert not list((tmp_path / "out").glob("trials.csv"))


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory, cifar10):
    out = tmp_path_factory.mktemp("search") / "out"
    assert search_dcl.main(tiny_args(cifar10, out, "--n-trials", "4", "--epochs", "2", "--sampler-seed", "0",
                                     **SEARCH)) == 0
    return out


def test_tiny_search_writes_every_output(tiny_search, capsys):
    out = tiny_search
    for name in ("best_graph.json", "trials.csv", "asha.png", "search_summary.json", "study.journal"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_csv(out / "trials.csv")
    # the study began with the baselines of this space, in canonical form
    assert [(r["role"], r["gates"]) for r in rows[:2]] == [
        ("independent", "through,cutoff,cutoff;cutoff,through,cutoff;cutoff,cutoff,through"),
        ("dml", "through,through,through;through,through,through;through,through,through")]
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    assert len(done) == 4
    for r in done:
        assert r["models"] == "resnet20,resnet20,resnet20"
        # pruned at the one rung (epoch 1) below the budget; a trial that reaches epoch 2 completes
        assert int(r["epochs"]) == (2 if r["state"] == "COMPLETE" else 1)
        assert 0.0 <= float(r["value"]) <= 100.0
        assert float(r["value"]) == round(float(r["value"]))  # 100 validation images
        assert len(r["gates"].split(";")) == 3
    assert any(r["state"] == "COMPLETE" for r in done)
    best = max((r for r in done if r["state"] == "COMPLETE"), key=lambda r: float(r["value"]))
    graph = Graph.load(out / "best_graph.json")
    assert [n.model for n in graph.nodes] == ["resnet20"] * 3
    assert ";".join(",".join(row) for row in graph.gates) == best["gates"]
    drawings = sorted(p.name for p in (out / "top_graphs").glob("*.png"))
    complete = sum(r["state"] == "COMPLETE" for r in done)
    assert len(drawings) == min(3, complete) and drawings[0].startswith(f"rank1_trial{best['number']}")
    summary = json.loads((out / "search_summary.json").read_text())
    assert summary["best"]["trial"] == int(best["number"])
    # the objective is the validation split: every reported value matches a per-node top-1 row
    study = load(out)
    for t in finished(study):
        assert len(t.intermediate_values) == int(next(r for r in rows if int(r["number"]) == t.number)["epochs"])
        assert t.user_attrs["top1"][0] == pytest.approx(t.intermediate_values[max(t.intermediate_values)], abs=1e-3)


def test_tiny_search_resumes(tiny_search, cifar10, capsys):
    out = tiny_search
    before = {t.number: (t.state, t.value, t.params) for t in finished(load(out))}
    assert search_dcl.main(tiny_args(cifar10, out, "--n-trials", "6", "--epochs", "2", **SEARCH)) == 0
    printed = capsys.readouterr().out
    assert "6/6 trials finished" in printed and "rank" in printed
    study = load(out)
    assert len(finished(study)) == 6
    assert {n: v for n, v in ((t.number, (t.state, t.value, t.params)) for t in finished(study))
            if n in before} == before
    # the study is full: running it again trains nothing
    assert search_dcl.main(tiny_args(cifar10, out, "--n-trials", "6", "--epochs", "2", **SEARCH)) == 0
    assert len(load(out).get_trials()) == len(study.get_trials())
    assert len([r for r in read_csv(out / "trials.csv") if r["state"] in ("COMPLETE", "PRUNED")]) == 6
    # other settings are refused instead of mixing incomparable trials
    assert search_dcl.main(tiny_args(cifar10, out, "--n-trials", "6", "--epochs", "3", **SEARCH)) == 2
    assert "epochs: 2 in the study, 3 now" in capsys.readouterr().err


def test_report_on_a_tiny_search(tiny_search, cifar10, capsys):
    """--report: the top graph and the baselines, two seeds each, on the test split; a second report trains nothing."""
    out = tiny_search
    args = tiny_args(cifar10, out, "--n-trials", "4", "--epochs", "2", "--report", "--report-top", "1",
                     "--report-seeds", "2", **SEARCH)
    assert search_dcl.main(args) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "report.json").read_text())
    assert [r["role"] for r in rows[:2]] == ["independent", "dml"]
    assert len({(r["models"], r["gates"]) for r in rows}) == len(rows)  # a graph appears once
    best = json.loads((out / "search_summary.json").read_text())["best"]
    assert [r["trial"] for r in rows if r["rank"] == 1] == [best["trial"]]
    runs = []
    for r in rows:
        assert r["n"] == 2 and len(r["top1"]) == 2 and len(r["seeds"]) == 2
        assert r["mean"] == pytest.approx(sum(r["top1"]) / 2)
        assert r["std"] == pytest.approx(abs(r["top1"][0] - r["top1"][1]) / 2 ** 0.5)
        for run, top1 in zip(r["runs"], r["top1"]):
            run = out / run
            config = json.loads((run / "config.json").read_text())
            assert config["val_size"] == 0 and config["eval_split"] == "test"  # validation images back in training
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert [rec["epoch"] for rec in records] == [1, 2] and records[-1]["split"] == "test"
            assert top1 == records[-1]["top1"][0]  # node 0 at the last epoch
            trained = json.loads((run / "graph.json").read_text())["gates"]
            assert r["gates"] == ";".join(",".join(row) for row in trained)  # the canonical form is what trained
            runs.append(run)
    assert len(runs) == 2 * len(rows) and f"trained {len(runs)} run(s)" in printed
    md = (out / "report.md").read_text()
    assert all(f"{r['mean']:.2f} ± {r['std']:.2f}" in md for r in rows)
    assert (out / "report.png").stat().st_size > 0
    # a second report trains nothing: no run file is touched
    stamps = {p: p.stat().st_mtime_ns for run in runs for p in run.rglob("*") if p.is_file()}
    assert search_dcl.main(args) == 0
    assert "trained 0 run(s)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for run in runs for p in run.rglob("*") if p.is_file()} == stamps
    assert json.loads((out / "report.json").read_text()) == rows


def test_report_needs_a_study(tmp_path, cifar10, capsys):
    args = tiny_args(cifar10, tmp_path / "out", "--n-trials", "1", "--epochs", "1", "--report")
    assert search_dcl.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("search_dcl.py: error: --report: the storage holds no study 'ktg-cifar10-3nodes'")


def test_best_graph_transfers_to_another_dataset(tiny_search, tmp_path, shared_data):
    """The paper's graph transfer: searched on CIFAR-10, trained on Tiny-ImageNet (200 classes)."""
    out = tmp_path / "transfer"
    code = train_dcl.main(["--graph", str(tiny_search / "best_graph.json"), "--dataset", "tiny-imagenet",
                           "--data-dir", str(shared_data / "tiny-imagenet-200"), "--epochs", "1",
                           "--train-subset", "200", "--eval-subset", "200", "--batch-size", "100",
                           "--workers", "0", "--no-progress", "--output", str(out)])
    assert code == 0
    import torch

    weights = torch.load(out / "nodes" / "node0_resnet20.pth", weights_only=True)
    assert weights["num_classes"] == 200 and weights["dataset"] == "tiny-imagenet"


# ----------------------------------------------------------------------- worker processes


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "search_dcl.py"), *args], cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_workers(args: list[str]) -> list[str]:
    procs = [_start(args) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-3000:]
    return outs


def test_two_worker_processes_share_the_embedded_storage(tmp_path, cifar10):
    out = tmp_path / "out"
    _two_workers(tiny_args(cifar10, out, "--n-trials", "3", "--epochs", "1", "--num-nodes", "2"))
    study = load(out, "ktg-cifar10-2nodes")
    assert len(finished(study)) == 3
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len(list((out / "logs").glob("*.log"))) == 2
    # both workers queued the baselines; they ran (a copy queued twice would replay the first)
    assert {"independent", "dml"} <= {t.user_attrs.get("baseline") for t in finished(study)}


def test_accelerate_launch_runs_independent_workers(tmp_path, cifar10):
    """Under `accelerate launch --num_processes 2` each process is a worker of its own (no DDP group)."""
    out = tmp_path / "out"
    env = dict(_env(), ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO_ROOT / "search_dcl.py"),
           *tiny_args(cifar10, out, "--n-trials", "4", "--epochs", "1", "--num-nodes", "2", "--no-baselines")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("best graph (trial") == 1  # rank 0 alone reports
    assert sorted(p.name.rsplit("-", 1)[1] for p in (out / "logs").glob("*.log")) == ["rank0.log", "rank1.log"]
    study = load(out, "ktg-cifar10-2nodes")
    assert len(finished(study)) == 4
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in finished(study)} <= {"rank0", "rank1"}
    assert not [t for t in study.get_trials() if "baseline" in t.user_attrs]  # --no-baselines
    assert (out / "best_graph.json").is_file()


def _postgres_url() -> str:
    url = os.environ.get("TIMM_DCL_TEST_POSTGRES")
    if not url:
        pytest.skip("TIMM_DCL_TEST_POSTGRES is not set (.ci/postgres.sh starts a server and sets it)")
    try:
        open_storage(url, "unused.journal")
    except StorageError as e:
        pytest.skip(f"no PostgreSQL server at TIMM_DCL_TEST_POSTGRES: {e}")
    return url


def test_two_worker_processes_share_postgresql(tmp_path, cifar10):
    url = _postgres_url()
    name = f"pg-{os.getpid()}-{time.time_ns()}"
    _two_workers(tiny_args(cifar10, tmp_path / "out", "--n-trials", "3", "--epochs", "1", "--num-nodes", "2",
                           "--storage", url, "--study-name", name))
    study = optuna.load_study(study_name=name, storage=open_storage(url, "unused.journal"))
    assert len(finished(study)) == 3
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len({t.user_attrs["worker"] for t in finished(study)}) >= 1
    assert not (tmp_path / "out" / "study.journal").exists()  # nothing went to the embedded storage


def test_a_killed_workers_trial_becomes_fail(tmp_path, cifar10):
    out = tmp_path / "out"
    args = tiny_args(cifar10, out, "--n-trials", "2", "--epochs", "2", "--num-nodes", "2",
                     "--heartbeat-interval", "1", "--grace-period", "2")
    victim = _start(args)
    journal = out / "study.journal"
    deadline = time.time() + 180
    running = None
    try:
        while running is None and time.time() < deadline and victim.poll() is None:
            time.sleep(0.1)
            if journal.exists() and journal.stat().st_size:
                try:
                    study = load(out, "ktg-cifar10-2nodes")
                except KeyError:  # the study is not created yet
                    continue
                # mid-trial: running, parameters sampled, its first epoch not reported yet
                running = next((t for t in study.get_trials() if t.state == TrialState.RUNNING and t.params
                                and not t.intermediate_values), None)
        assert running is not None, "the worker never started a trial"
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.communicate()
    assert load(out, "ktg-cifar10-2nodes").trials[running.number].state == TrialState.RUNNING
    rescuer = subprocess.run([sys.executable, str(REPO_ROOT / "search_dcl.py"), *args], cwd=REPO_ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert rescuer.returncode == 0, rescuer.stdout[-3000:]
    study = load(out, "ktg-cifar10-2nodes")
    assert study.trials[running.number].state == TrialState.FAIL
    assert len(finished(study)) == 2
    row = next(r for r in read_csv(out / "trials.csv") if int(r["number"]) == running.number)
    assert row["state"] == "FAIL" and "worker lost" in row["note"]
