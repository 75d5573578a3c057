"""Search-space hygiene: canonical graphs, recognised duplicates, seeded baselines."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from timm_dcl.config import TrainConfig
from timm_dcl.search import (SearchSpace, SearchWorker, canonical_gates, canonical_graph, enqueue_baselines,
                             open_storage, open_study, write_trials_csv)

optuna.logging.set_verbosity(optuna.logging.WARNING)
T, C, L, K = "through", "cutoff", "linear", "correct"


def test_a_correct_gate_on_the_diagonal_is_through():
    gates = [[K, K], [L, K]]
    assert canonical_gates(gates) == [[T, K], [L, T]]  # off the diagonal, correct stays correct
    assert gates == [[K, K], [L, K]]  # the input is not modified
    a = canonical_graph(["resnet20", "resnet32"], [[K, T], [C, K]])
    b = canonical_graph(["resnet20", "resnet32"], [[T, T], [C, T]])
    assert a == b and a.key == b.key and a.id == b.id
    assert a.gates_text == "through,through;cutoff,through"
    assert canonical_graph(["resnet20", "resnet32"], [[T, K], [C, T]]).key != a.key


def test_nodes_after_the_target_are_interchangeable():
    models = ["resnet20", "resnet32", "resnet44"]
    gates = [[T, L, C], [K, T, C], [C, C, T]]
    swapped_models = ["resnet20", "resnet44", "resnet32"]
    swapped = [[T, C, L], [C, T, C], [K, C, T]]  # rows and columns 1, 2 exchanged
    assert canonical_graph(models, gates) == canonical_graph(swapped_models, swapped)
    # node 0 is the target: moving it is a different graph
    moved = canonical_graph(["resnet32", "resnet20", "resnet44"], [[T, K, C], [L, T, C], [C, C, T]])
    assert moved != canonical_graph(models, gates)


def test_baselines_of_the_space(tmp_path):
    space = SearchSpace(3, "resnet20", ("resnet20", "resnet32"), "cifar10")
    base = space.baselines()
    assert [(b.name, b.models) for b in base] == [("independent", ["resnet20", "resnet20"]),
                                                  ("dml", ["resnet20", "resnet20"]), ("dml", ["resnet32", "resnet32"])]
    assert space.canonical(base[0].params).gates_text == "through,cutoff,cutoff;cutoff,through,cutoff;cutoff,cutoff,through"
    assert space.canonical(base[1].params).gates_text == ";".join([",".join([T] * 3)] * 3)
    # KD appears for each candidate with a pre-trained checkpoint: node 0 learns from labels and teachers
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "resnet32.pth").write_bytes(b"x")
    space = SearchSpace(3, "resnet20", ("resnet20", "resnet32"), "cifar10", str(tmp_path))
    kd = [b for b in space.baselines() if b.name == "kd"]
    assert len(kd) == 1 and kd[0].models == ["resnet32", "resnet32"]
    graph = space.graph_from_params(kd[0].params)
    assert graph.frozen_nodes == (1, 2) and graph.gates[0] == [T, T, T]
    # one node: independent and DML are one graph, listed once
    assert [b.name for b in SearchSpace(1, "resnet20", (), "cifar10").baselines()] == ["independent"]


def _fake_train(calls):
    def train(self, trial, graph):
        calls.append(trial.number)
        for epoch in (1, 2):
            trial.report(10.0 + trial.number + epoch, epoch)
        return 10.0 + trial.number + 2
    return train


def test_baselines_come_first_and_are_queued_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SearchWorker, "_train", _fake_train(calls))
    storage = open_storage(None, tmp_path / "s.journal")
    study = open_study(storage, "s", {}, sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    assert enqueue_baselines(study, space) == ["independent", "dml"]
    assert enqueue_baselines(study, space) == []  # a second worker queues nothing more
    cfg = TrainConfig(dataset="cifar10", epochs=2, val_size=10)
    SearchWorker(study, storage, space, cfg, None, n_trials=4, say=lambda m: None).run()
    trials = study.get_trials()
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["independent", "dml"]
    assert [t.params["gate_0_1"] for t in trials[:2]] == [C, T]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4
    rows = (tmp_path / "trials.csv")
    write_trials_csv(study, space, rows)
    lines = rows.read_text().splitlines()
    assert ",independent,resnet20,resnet20,through,cutoff;cutoff,through," in lines[1].replace('"', "")


def test_a_baseline_whose_worker_died_is_queued_again(tmp_path):
    storage = open_storage(None, tmp_path / "s.journal")
    study = open_study(storage, "s", {})
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    enqueue_baselines(study, space)
    first = study.ask()
    space.sample(first)
    study.tell(first, state=TrialState.FAIL)  # as fail_stale does to a dead worker's trial
    assert enqueue_baselines(study, space) == ["independent"]


def test_a_canonical_duplicate_is_not_trained_twice(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SearchWorker, "_train", _fake_train(calls))
    storage = open_storage(None, tmp_path / "s.journal")
    study = open_study(storage, "s", {}, sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace(3, "resnet20", ("resnet20", "resnet32"), "cifar10")
    a = space.params(["resnet32", "resnet20"], [[T, L, C], [C, T, K], [T, C, T]])
    # the same graph: diagonal correct for through, and nodes 1 and 2 exchanged
    b = space.params(["resnet20", "resnet32"], [[T, C, L], [T, K, C], [C, K, T]])
    assert space.canonical(a) == space.canonical(b)
    study.enqueue_trial(a)
    study.enqueue_trial(b)
    lines = []
    SearchWorker(study, storage, space, TrainConfig(dataset="cifar10", epochs=2, val_size=10), None,
                 n_trials=2, say=lines.append).run()
    first, second = study.get_trials()
    assert calls == [0]  # trained once
    assert second.state == TrialState.COMPLETE and second.value == first.value
    assert second.intermediate_values == first.intermediate_values
    assert second.user_attrs["duplicate_of"] == 0 and second.user_attrs["graph"] == first.user_attrs["graph"]
    assert any("duplicate of trial 0, not trained" in line for line in lines)
    write_trials_csv(study, space, tmp_path / "trials.csv")
    assert "duplicate of trial 0 (not trained)" in (tmp_path / "trials.csv").read_text()


def test_a_duplicate_of_a_pruned_trial_is_pruned_at_the_same_epoch(tmp_path, monkeypatch):
    calls = []

    def pruned_train(self, trial, graph):
        calls.append(trial.number)
        trial.report(5.0, 1)
        raise optuna.TrialPruned()

    monkeypatch.setattr(SearchWorker, "_train", pruned_train)
    storage = open_storage(None, tmp_path / "s.journal")
    study = open_study(storage, "s", {})
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    dml = space.params(["resnet20"], [[T, T], [T, T]])
    study.enqueue_trial(dml)
    study.enqueue_trial(dml)
    SearchWorker(study, storage, space, TrainConfig(dataset="cifar10", epochs=2, val_size=10), None,
                 n_trials=2, say=lambda m: None).run()
    assert calls == [0]
    assert [t.state for t in study.get_trials()] == [TrialState.PRUNED] * 2
    assert study.get_trials()[1].intermediate_values == {1: 5.0}


def test_a_duplicate_of_a_running_trial_is_trained(tmp_path, monkeypatch):
    """Its twin has no result yet to reuse: both train, and the second says whose twin it is."""
    calls = []
    monkeypatch.setattr(SearchWorker, "_train", _fake_train(calls))
    storage = open_storage(None, tmp_path / "s.journal", heartbeat_interval=60)
    study = open_study(storage, "s", {})
    space = SearchSpace(2, "resnet20", ("resnet20",), "cifar10")
    dml = space.params(["resnet20"], [[T, T], [T, T]])
    study.enqueue_trial(dml)
    running = study.ask()  # another worker's trial, mid-training
    space.sample(running)
    running.set_user_attr("graph", space.canonical(dml).key)
    study.enqueue_trial(dml)
    worker = SearchWorker(study, storage, space, TrainConfig(dataset="cifar10", epochs=2, val_size=10), None,
                          n_trials=3, say=lambda m: None)
    trial = study.ask()
    assert worker._objective(trial) == 10.0 + trial.number + 2
    assert calls == [trial.number] and trial.user_attrs["same_as_running"] == running.number


def test_a_study_stored_before_a_recipe_field_existed_still_resumes(tmp_path):
    import optuna

    from timm_dcl.search.storage import SETTINGS_KEY, open_study

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'old.db'}")
    old = {"epochs": 2, "lr": 0.1}
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.set_user_attr(SETTINGS_KEY, old)
    # the newer version adds fields at their defaults: the same study
    open_study(storage, "s", {**old, "ensemble_mean": "logits", "recipe": "timm-dcl"})
    # a field set to another value is still another study
    with pytest.raises(ValueError, match="ensemble_mean: 'logits' in the study, 'probs' now"):
        open_study(storage, "s", {**old, "ensemble_mean": "probs"})
