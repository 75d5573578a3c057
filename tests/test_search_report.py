"""The final report's bookkeeping, with a stand-in trainer: which graphs, which runs, resumes, locks.

The real trainer runs in test_search.py::test_report_on_a_tiny_search (CIFAR-10, two seeds).
"""
from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

import timm_dcl.trainer
from timm_dcl.config import TrainConfig
from timm_dcl.search import ReportSettings, SearchSpace, enqueue_baselines, open_storage, open_study, run_report
from timm_dcl.search.report import _try_lock

optuna.logging.set_verbosity(optuna.logging.WARNING)
T, C, L, K = "through", "cutoff", "linear", "correct"
EPOCHS = 2


def fake_top1(gates: list[list[str]], seed: int, epoch: int) -> float:
    """Differs by graph and seed, and falls after epoch 1: the last epoch is not the best one."""
    return 40.0 + sum(row.count(T) for row in gates) + seed - epoch


@pytest.fixture
def trainer(monkeypatch):
    """Records every call; writes what train_dcl.py's trainer leaves in a run directory."""
    calls = []

    def train_graph(graph, cfg, *, data=None, accelerator=None, epoch_callback=None):
        calls.append({"output": cfg.output, "resume": cfg.resume, "seed": cfg.seed, "data": data,
                      "val_size": cfg.val_size, "eval_split": cfg.eval_split})
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict()))
        graph.save(out / "graph.json")
        done = len((out / "metrics.jsonl").read_text().splitlines()) if cfg.resume else 0
        with open(out / "metrics.jsonl", "a" if cfg.resume else "w") as f:
            for epoch in range(done + 1, cfg.epochs + 1):
                top1 = fake_top1(graph.gates, cfg.seed, epoch)
                f.write(json.dumps({"epoch": epoch, "top1": [top1] * graph.num_nodes,
                                    "ensemble_top1": top1 + 1, "split": cfg.eval_split}) + "\n")

    monkeypatch.setattr(timm_dcl.trainer, "train_graph", train_graph)
    return calls


def _finish(study, space, params: dict, value: float) -> None:
    study.enqueue_trial(params)
    trial = study.ask()
    space.sample(trial)
    trial.set_user_attr("graph", space.canonical(trial.params).key)
    study.tell(trial, value)


@pytest.fixture
def study(tmp_path):
    """Baselines scored 40 (independent) and 70 (DML: the best); two searched graphs at 60 and 50."""
    space = SearchSpace(3, "resnet20", ("resnet20",), "cifar10")
    storage = open_storage(None, tmp_path / "study.journal")
    study = open_study(storage, "s", {})
    enqueue_baselines(study, space)
    for value in (40.0, 70.0):
        trial = study.ask()
        space.sample(trial)
        trial.set_user_attr("graph", space.canonical(trial.params).key)
        study.tell(trial, value)
    _finish(study, space, space.params(["resnet20"] * 2, [[T, L, C], [K, T, C], [C, C, T]]), 60.0)
    _finish(study, space, space.params(["resnet20"] * 2, [[T, C, L], [C, T, C], [K, C, T]]), 60.0)  # its twin
    _finish(study, space, space.params(["resnet20"] * 2, [[K, K, K], [C, T, C], [L, L, T]]), 50.0)
    # DML written with correct gates on the diagonal: the same graph as the DML baseline
    _finish(study, space, space.params(["resnet20"] * 2, [[K, T, T], [T, K, T], [T, T, K]]), 75.0)
    return study, space


CFG = TrainConfig(dataset="cifar10", epochs=EPOCHS, val_size=10, eval_split="val", seed=3)


def test_rows_are_the_baselines_and_the_top_graphs_over_seeds(study, trainer, tmp_path):
    study, space = study
    lines = []
    report = run_report(study, space, CFG, tmp_path, ReportSettings(top=2, seeds=2), load_data=lambda: "DATA",
                        say=lines.append)
    rows = json.loads((tmp_path / "report.json").read_text())
    assert rows == report["rows"]
    # DML was also the best searched graph: one row, the baseline's, with its rank
    assert [(r["role"], r["rank"], r["trial"]) for r in rows] == [("independent", None, None), ("dml", 1, 5),
                                                                   ("searched", 2, 2)]
    assert rows[1]["val_top1"] == 75.0 and rows[1]["gates"] == "through,through,through;" * 2 + "through,through,through"
    # the canonical form of trial 2's graph: of its two node orders, the one its twin (trial 3) was drawn in
    assert rows[2]["gates"] == "through,cutoff,linear;cutoff,through,cutoff;correct,cutoff,through"
    assert len(trainer) == 6 and report["trained"] == 6
    # every run: the whole training split, scored on the test split, one seed each, the data loaded once
    assert {(c["val_size"], c["eval_split"], c["data"]) for c in trainer} == {(0, "test", "DATA")}
    assert sorted({c["seed"] for c in trainer}) == [3, 4]
    for r in rows:
        gates = [row.split(",") for row in r["gates"].split(";")]
        assert r["top1"] == [fake_top1(gates, seed, EPOCHS) for seed in (3, 4)]  # the last epoch, not the best
        assert r["n"] == 2 and r["seeds"] == [3, 4]
        assert r["mean"] == pytest.approx(statistics.fmean(r["top1"]))
        assert r["std"] == pytest.approx(statistics.stdev(r["top1"]))
        assert r["ensemble_top1"] == [v + 1 for v in r["top1"]]
        assert r["models"] == "resnet20,resnet20,resnet20"
        for run in r["runs"]:
            assert (tmp_path / run / "graph.json").is_file()
    md = (tmp_path / "report.md").read_text()
    for r in rows:
        assert f"| {r['name']} |" in md and f"{r['mean']:.2f} ± {r['std']:.2f}" in md
    assert (tmp_path / "report.png").stat().st_size > 0
    assert sum("training" in line for line in lines) == 6

    # a second report finds every run done: it trains nothing and does not even load the data
    def no_data():
        raise AssertionError("loaded the data although nothing needed training")

    again = run_report(study, space, CFG, tmp_path, ReportSettings(top=2, seeds=2), load_data=no_data,
                       say=lines.append)
    assert len(trainer) == 6 and again["trained"] == 0 and again["rows"] == rows
    # a third seed trains the third run of every graph only
    run_report(study, space, CFG, tmp_path, ReportSettings(top=2, seeds=3), load_data=lambda: "DATA",
               say=lines.append)
    assert len(trainer) == 9 and {c["seed"] for c in trainer[6:]} == {5}


def test_an_interrupted_run_resumes(study, trainer, tmp_path):
    study, space = study
    run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=1), load_data=lambda: None,
               say=lambda m: None)
    run = tmp_path / json.loads((tmp_path / "report.json").read_text())[0]["runs"][0]
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # killed after epoch 1
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pth").write_bytes(b"x")
    del trainer[:]
    report = run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=1), load_data=lambda: None,
                        say=lambda m: None)
    assert [(c["output"], c["resume"]) for c in trainer] == [(str(run), str(run))]
    assert report["rows"][0]["top1"] == [fake_top1([[T, C, C], [C, T, C], [C, C, T]], 3, EPOCHS)]


def test_runs_of_other_settings_are_refused(study, trainer, tmp_path):
    study, space = study
    run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=1), load_data=lambda: None,
               say=lambda m: None)
    other = TrainConfig(dataset="cifar10", epochs=EPOCHS, val_size=10, eval_split="val", seed=3, lr=0.05)
    with pytest.raises(ValueError, match=r"trained with other settings \(lr: 0.1, now 0.05\)"):
        run_report(study, space, other, tmp_path, ReportSettings(top=0, seeds=1), load_data=lambda: None,
                   say=lambda m: None)


def test_nothing_to_report_is_an_error(tmp_path, trainer):
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    study = open_study(open_storage(None, tmp_path / "s.journal"), "s", {})
    with pytest.raises(ValueError, match="nothing to report"):
        run_report(study, space, CFG, tmp_path, ReportSettings(), load_data=lambda: None, baselines=False)
    with pytest.raises(ValueError, match="--report-seeds must be an integer ≥ 1"):
        ReportSettings(seeds=0)


HOLD = ("import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n")


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    lock = tmp_path / "seed0.lock"
    with _try_lock(lock) as mine:
        with _try_lock(lock) as again:
            assert mine and not again
    holder = _hold(lock, 60)
    try:
        with _try_lock(lock) as mine:
            assert not mine
        holder.send_signal(signal.SIGKILL)  # a worker killed mid-run: the kernel drops its lock
        holder.wait()
        with _try_lock(lock) as mine:
            assert mine
    finally:
        holder.kill()
        holder.wait()


def test_a_run_another_worker_holds_is_left_to_it_until_released(study, trainer, tmp_path):
    study, space = study
    graph_id = space.canonical(space.baselines()[0].params).id
    holder = _hold(tmp_path / "report" / graph_id / "seed0.lock", 1.5)  # trains nothing, then dies
    lines = []
    try:
        run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=1, poll_interval=0.2),
                   load_data=lambda: None, say=lines.append)
    finally:
        holder.kill()
        holder.wait()
    outputs = [Path(c["output"]).parent.name for c in trainer]
    assert outputs.count(graph_id) == 1 and outputs[-1] == graph_id  # trained last, once the lock was free
    assert any("waiting for 1 run(s)" in line for line in lines)


def test_a_diverged_run_is_reported_and_not_retried(study, trainer, tmp_path, monkeypatch):
    study, space = study
    train = timm_dcl.trainer.train_graph

    def diverging(graph, cfg, **kwargs):
        train(graph, cfg, **kwargs)
        if graph.gates[0][1] == T and cfg.seed == 4:  # DML, second seed
            raise FloatingPointError("epoch 2: the training loss is not finite")

    monkeypatch.setattr(timm_dcl.trainer, "train_graph", diverging)
    lines = []
    report = run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=2), load_data=lambda: None,
                        say=lines.append)
    dml = next(r for r in report["rows"] if r["role"] == "dml")
    assert dml["top1"][1] is None and dml["n"] == 1 and dml["diverged"] == 1
    assert dml["mean"] == dml["top1"][0] and dml["std"] == 0.0
    assert any("diverged" in line for line in lines)
    assert "diverged" in (tmp_path / "report.md").read_text()
    again = run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=2), load_data=lambda: None,
                       say=lines.append)
    assert again["trained"] == 0 and again["rows"] == report["rows"]
