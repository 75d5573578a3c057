"""The search over an ensemble node 0 (--ensemble-target) and over feature edges (--feature-edges)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import search_dcl
from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph
from timm_dcl.search import (CanonicalGraph, InvalidGraph, SearchSpace, SearchWorker, canonical_graph,
                             enqueue_baselines, open_storage, open_study, search_settings, split_key,
                             write_trials_csv)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
T, C, L, K = "through", "cutoff", "linear", "correct"


def _text(rows) -> str:
    return ";".join(",".join(row) for row in rows)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ canonical form


def test_a_graph_without_feature_edges_keeps_its_key():
    """Studies and report folders on disk are found by these: computed before feature edges existed."""
    c = canonical_graph(["resnet20", "resnet32", "resnet44"], [[T, L, C], [K, T, C], [C, C, T]])
    assert c.key == "resnet20,resnet32,resnet44|through,linear,cutoff;correct,through,cutoff;cutoff,cutoff,through"
    assert c.id == "313c392d6d76"
    c = canonical_graph(["resnet32", "wrn28_2", "resnet110"], [[K, C, L], [T, C, C], [L, L, K]])
    assert c.key == "resnet32,resnet110,wrn28_2|through,linear,cutoff;linear,through,linear;through,cutoff,cutoff"
    assert c.id == "c52cd26ef1f9"
    # all-cutoff feature gates are no feature edge at all
    assert canonical_graph(["resnet32", "wrn28_2", "resnet110"], [[K, C, L], [T, C, C], [L, L, K]],
                           [[C] * 3] * 3) == c
    assert c.feature_gates is None and c.feature_gates_text == "" and split_key(c.key)[2] == ""
    assert CanonicalGraph(c.models, c.gates, ((C, C, C),) * 3) == c


def test_relabelling_permutes_the_feature_gates_too():
    models = ["resnet20", "resnet32", "resnet44"]
    gates = [[T, L, C], [K, T, C], [C, C, T]]
    features = [[C, T, C], [C, C, L], [K, C, C]]
    swapped_models = ["resnet20", "resnet44", "resnet32"]
    swapped_gates = [[T, C, L], [C, T, C], [K, C, T]]
    swapped_features = [[C, C, T], [K, C, C], [C, L, C]]  # rows and columns 1, 2 exchanged
    a = canonical_graph(models, gates, features)
    b = canonical_graph(swapped_models, swapped_gates, swapped_features)
    assert a == b and a.key == b.key and a.id == b.id
    assert a.models == ("resnet20", "resnet32", "resnet44")
    assert a.feature_gates_text == _text(features)
    assert a.key == f"{a.models_text}|{a.gates_text}|{a.feature_gates_text}"
    assert split_key(a.key) == (a.models_text, a.gates_text, a.feature_gates_text)
    plain = canonical_graph(models, gates)
    assert a.key.startswith(plain.key + "|") and a.id != plain.id
    # the same logit graph with the feature edges not permuted is another graph
    assert canonical_graph(swapped_models, swapped_gates, features) != a


def test_feature_edges_that_train_nothing_are_cut():
    models = ["ensemble", "resnet20", "resnet32"]
    gates = [[C, C, C], [T, T, C], [C, C, C]]  # node 2: all cutoff, a frozen teacher
    wild = [[T, T, T], [L, T, K], [T, T, T]]  # diagonal, row 0, column 0, row 2: none can train
    c = canonical_graph(models, gates, wild)
    assert c.feature_gates == ((C, C, C), (C, C, K), (C, C, C))
    assert c == canonical_graph(models, gates, [[C, C, C], [C, C, K], [C, C, C]])
    # an edge into the frozen node only: no feature edge at all
    assert canonical_graph(models, gates, [[C] * 3, [C] * 3, [C, T, C]]) == canonical_graph(models, gates)


# ------------------------------------------------------------------------------ --ensemble-target


def _sampled(space: SearchSpace, n: int, seed: int = 0):
    """(params, graph) of ``n`` valid random samples of ``space``."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    while len(out) < n:
        trial = study.ask()
        try:
            graph = space.sample(trial)
        except InvalidGraph:
            study.tell(trial, state=TrialState.FAIL)
            continue
        study.tell(trial, 0.0)
        out.append((trial.params, graph))
    return out


def test_an_ensemble_target_samples_nodes_1_to_m_minus_1_only():
    space = SearchSpace(3, candidates=("resnet20", "resnet32"), dataset="cifar10", ensemble_target=True)
    assert space.target_model == "ensemble" and space.input_model == "resnet20"
    names = space.param_names()
    assert not [p for p in names if p.startswith("gate_0_")]
    assert names == ["model_1", "model_2", "gate_1_0", "gate_1_1", "gate_1_2", "gate_2_0", "gate_2_1", "gate_2_2"]
    for params, graph in _sampled(space, 12):
        assert set(params) == set(names)
        assert graph.nodes[0].is_ensemble and graph.nodes[0].members is None
        assert graph.ensemble_members(0) == (1, 2)
        assert graph.gates[0] == [C, C, C]
        assert {n.model for n in graph.nodes[1:]} <= {"resnet20", "resnet32"}
        assert not graph.has_feature_edges
        canon = space.canonical(params)
        assert canon.models[0] == "ensemble" and canon.key.startswith("ensemble,")
        assert space.canonical_build(params).gates[0] == [C, C, C]


def test_ensemble_target_baselines():
    space = SearchSpace(3, candidates=("resnet20", "resnet32"), dataset="cifar10", ensemble_target=True)
    base = space.baselines()
    assert [(b.name, b.models) for b in base] == [
        ("independent", ["resnet20", "resnet20"]), ("independent", ["resnet32", "resnet32"]),
        ("dml", ["resnet20", "resnet20"]), ("dml", ["resnet32", "resnet32"])]
    assert space.canonical(base[0].params).gates_text == _text([[C, C, C], [C, T, C], [C, C, T]])
    assert space.canonical(base[2].params).gates_text == _text([[C, C, C], [C, T, T], [C, T, T]])
    for b in base:
        assert not any(k.startswith("gate_0_") for k in b.params)
        graph = space.graph_from_params(b.params)
        assert graph.nodes[0].is_ensemble and graph.trainable_nodes == (1, 2)


def test_ensemble_target_skips_kd_and_freezes_like_any_node(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "resnet32.pth").write_bytes(b"x")  # found, not loaded: building a graph reads nothing
    space = SearchSpace(3, candidates=("resnet20", "resnet32"), dataset="cifar10", pretrained_dir=str(tmp_path),
                        ensemble_target=True)
    assert "kd" not in {b.name for b in space.baselines()}
    params = space.params(["resnet20", "resnet32"], [[C, C, C], [T, C, T], [C, C, C]])
    graph = space.graph_from_params(params)
    assert graph.frozen_nodes == (2,) and graph.trainable_nodes == (1,)
    # an ensemble of frozen nodes only would train nothing
    with pytest.raises(InvalidGraph, match="nothing would train"):
        space.graph_from_params(space.params(["resnet32", "resnet32"], [[C] * 3] * 3))


def test_ensemble_target_refusals():
    with pytest.raises(ValueError, match="--target-model resnet20 cannot be used with --ensemble-target"):
        SearchSpace(3, "resnet20", ("resnet20",), "cifar10", ensemble_target=True)
    with pytest.raises(ValueError, match="--ensemble-target needs --num-nodes ≥ 2"):
        SearchSpace(1, None, ("resnet20",), "cifar10", ensemble_target=True)
    # the default target is still resnet32 without the flag
    assert SearchSpace(2, candidates=("resnet20",), dataset="cifar10").target_model == "resnet32"


@pytest.mark.parametrize("extra, message", [
    (["--ensemble-target", "--target-model", "resnet20"],
     "--target-model resnet20 cannot be used with --ensemble-target"),
    (["--ensemble-target", "--num-nodes", "1"], "--ensemble-target needs --num-nodes ≥ 2"),
    (["--feature-weight", "100"], "--feature-weight weighs the feature edges: it needs --feature-edges"),
    (["--feature-edges", "--feature-weight", "-1"], "--feature-weight must be a finite number ≥ 0"),
])
def test_bad_mode_flags_are_one_line_errors(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--num-nodes", "3", "--candidates", "resnet20", "--dataset", "cifar10", "--data-dir", str(tmp_path),
            "--n-trials", "1", "--epochs", "1", "--output", str(out), *extra]
    assert search_dcl.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("search_dcl.py: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


# ------------------------------------------------------------------------------ --feature-edges


def test_feature_edges_are_sampled_and_cut_where_they_train_nothing(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "resnet20.pth").write_bytes(b"x")
    space = SearchSpace(3, "resnet20", ("resnet20",), "cifar10", str(tmp_path), feature_edges=True)
    fgates = [p for p in space.param_names() if p.startswith("fgate_")]
    assert fgates == ["fgate_0_1", "fgate_0_2", "fgate_1_0", "fgate_1_2", "fgate_2_0", "fgate_2_1"]
    # node 2 drew an all-cutoff row: a frozen teacher, whose sampled feature edges are cut
    params = {**space.params(["resnet20", "resnet20"], [[T, C, T], [T, T, C], [C, C, C]]),
              **{p: T for p in fgates}}
    graph = space.graph_from_params(params)
    assert graph.frozen_nodes == (2,)
    assert graph.feature_gates == [[C, T, T], [T, C, T], [C, C, C]]
    canon = space.canonical(params)
    assert canon.feature_gates_text == _text(graph.feature_gates)
    assert space.canonical_build(params).feature_gates == graph.feature_gates
    # every sample builds a valid graph whose feature gates are its canonical ones
    for params, graph in _sampled(space, 15, seed=1):
        assert set(params) == set(space.param_names())
        canon = space.canonical(params)
        built = space.canonical_build(params)
        assert canon.feature_gates_text == (_text(built.feature_gates) if built.has_feature_edges else "")
        for t in built.frozen_nodes:
            assert not built.has_feature_edges or set(built.feature_gates[t]) == {C}


def test_feature_edges_with_an_ensemble_target():
    space = SearchSpace(3, candidates=("resnet20",), dataset="cifar10", ensemble_target=True, feature_edges=True)
    assert [p for p in space.param_names() if p.startswith("fgate_")] == ["fgate_1_2", "fgate_2_1"]
    base = space.baselines()
    assert [b.name for b in base] == ["independent", "dml", "dml+at"]
    for b in base[:2]:  # the classic graphs keep every feature edge cut
        assert space.canonical(b.params).feature_gates is None
    at = space.canonical(base[2].params)
    assert at.gates_text == space.canonical(base[1].params).gates_text
    assert at.feature_gates_text == "cutoff,cutoff,cutoff;cutoff,cutoff,through;cutoff,through,cutoff"
    for params, graph in _sampled(space, 10, seed=2):
        assert graph.nodes[0].is_ensemble and graph.gates[0] == [C, C, C]
        if graph.has_feature_edges:
            assert graph.feature_gates[0] == [C, C, C] and [row[0] for row in graph.feature_gates] == [C, C, C]


def test_dml_at_baseline_of_a_trained_target():
    space = SearchSpace(3, "resnet20", ("resnet20", "resnet32"), "cifar10", feature_edges=True)
    base = space.baselines()
    assert [(b.name, b.models[0]) for b in base] == [("independent", "resnet20"), ("dml", "resnet20"),
                                                     ("dml", "resnet32"), ("dml+at", "resnet20"),
                                                     ("dml+at", "resnet32")]
    graph = space.graph_from_params(base[3].params)
    assert graph.gates == [[T] * 3] * 3
    assert graph.feature_gates == [[C, T, T], [T, C, T], [T, T, C]]
    # without --feature-edges the baselines are those of before
    assert [b.name for b in SearchSpace(3, "resnet20", ("resnet20",), "cifar10").baselines()] == ["independent", "dml"]


# ------------------------------------------------------------------------------ the study


def test_settings_name_the_modes_only_when_on_and_refuse_mixing(tmp_path):
    cfg = TrainConfig(dataset="cifar10", epochs=2, val_size=10)
    plain = SearchSpace(3, "resnet20", ("resnet20",), "cifar10")
    assert set(plain.settings()) == {"num_nodes", "target_model", "candidates", "dataset", "temperature"}
    both = SearchSpace(3, None, ("resnet20",), "cifar10", ensemble_target=True, feature_edges=True,
                       feature_weight=100.0)
    assert {k: both.settings()[k] for k in ("target_model", "ensemble_target", "feature_edges", "feature_weight")} == \
        {"target_model": "ensemble", "ensemble_target": True, "feature_edges": True, "feature_weight": 100.0}
    storage = open_storage(None, tmp_path / "s.journal")
    open_study(storage, "s", search_settings(plain, cfg, min_resource=1, reduction_factor=2))
    open_study(storage, "s", search_settings(plain, cfg, min_resource=1, reduction_factor=2))  # resumes
    features = SearchSpace(3, "resnet20", ("resnet20",), "cifar10", feature_edges=True)
    with pytest.raises(ValueError, match="feature_edges: False in the study, True now"):
        open_study(storage, "s", search_settings(features, cfg, min_resource=1, reduction_factor=2))
    with pytest.raises(ValueError, match="ensemble_target: False in the study, True now"):
        open_study(storage, "s", search_settings(both, cfg, min_resource=1, reduction_factor=2))


def test_trials_csv_carries_the_feature_gates(tmp_path, monkeypatch):
    def fake_train(self, trial, graph):
        trial.report(50.0, 1)
        return 50.0

    monkeypatch.setattr(SearchWorker, "_train", fake_train)
    storage = open_storage(None, tmp_path / "s.journal")
    study = open_study(storage, "s", {}, sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace(3, None, ("resnet20",), "cifar10", ensemble_target=True, feature_edges=True)
    assert enqueue_baselines(study, space) == ["independent", "dml", "dml+at"]
    cfg = TrainConfig(dataset="cifar10", epochs=1, val_size=10)
    SearchWorker(study, storage, space, cfg, None, n_trials=6, say=lambda m: None).run()
    write_trials_csv(study, space, tmp_path / "trials.csv")
    rows = _read_csv(tmp_path / "trials.csv")
    assert [r["role"] for r in rows[:3]] == ["independent", "dml", "dml+at"]
    assert rows[2]["feature_gates"] == "cutoff,cutoff,cutoff;cutoff,cutoff,through;cutoff,through,cutoff"
    for r, t in zip(rows, study.get_trials()):
        assert f"{r['models']}|{r['gates']}" + (f"|{r['feature_gates']}" if r["feature_gates"] else "") == \
            t.user_attrs["graph"]
        assert r["models"].startswith("ensemble,")


# ------------------------------------------------------------------------------ a real search


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches gain nothing from a second thread, and lose much when the cores are busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(cifar10: str, output: Path, *extra: str) -> list[str]:
    return ["--ensemble-target", "--feature-edges", "--num-nodes", "3", "--candidates", "resnet20",
            "--dataset", "cifar10", "--data-dir", cifar10, "--train-subset", "60", "--val-size", "20",
            "--eval-subset", "10", "--batch-size", "30", "--workers", "0", "--no-progress", "--poll-interval", "0.2",
            "--epochs", "1", "--n-trials", "4", "--sampler-seed", "0", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def ensemble_search(tmp_path_factory, cifar10, one_thread):
    out = tmp_path_factory.mktemp("ensemble_search") / "out"
    assert search_dcl.main(_tiny(cifar10, out)) == 0
    return out


def test_a_tiny_ensemble_search_with_feature_edges(ensemble_search):
    out = ensemble_search
    rows = _read_csv(out / "trials.csv")
    assert [r["role"] for r in rows[:3]] == ["independent", "dml", "dml+at"]
    assert rows[2]["feature_gates"] == "cutoff,cutoff,cutoff;cutoff,cutoff,through;cutoff,through,cutoff"
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(done) == 4
    for r in done:
        assert r["models"] == "ensemble,resnet20,resnet20" and r["gates"].startswith("cutoff,cutoff,cutoff;")
        # node 0's score is the ensemble's
        assert float(r["value"]) == pytest.approx(float(r["top1_nodes"].split()[0]), abs=0.01)
    best = max(done, key=lambda r: (float(r["value"]), -int(r["number"])))
    graph = Graph.load(out / "best_graph.json")
    assert graph.nodes[0].is_ensemble and graph.gates[0] == [C, C, C]
    assert _text(graph.gates) == best["gates"]
    assert (_text(graph.feature_gates) if graph.has_feature_edges else "") == best["feature_gates"]
    summary = json.loads((out / "search_summary.json").read_text())
    assert summary["settings"]["ensemble_target"] is True and summary["settings"]["feature_edges"] is True


def test_report_of_a_tiny_ensemble_search(ensemble_search, cifar10, capsys):
    out = ensemble_search
    assert search_dcl.main(_tiny(cifar10, out, "--report", "--report-top", "1", "--report-seeds", "2")) == 0
    capsys.readouterr()
    rows = json.loads((out / "report.json").read_text())
    assert [r["role"] for r in rows[:3]] == ["independent", "dml", "dml+at"]
    assert len({r["graph_id"] for r in rows}) == len(rows) and sum(r["rank"] == 1 for r in rows) == 1
    md = (out / "report.md").read_text()
    assert "| feature gates |" in md and "the ensemble of nodes 1…M−1" in md
    for r in rows:
        assert r["models"] == "ensemble,resnet20,resnet20" and r["n"] == 2
        trained = json.loads((out / r["runs"][0] / "graph.json").read_text())
        assert r["gates"] == _text(trained["gates"])
        if "feature_gates" in r:
            assert r["feature_gates"] == _text(trained["feature_gates"])
            assert f"`{r['feature_gates']}`" in md
        else:
            assert "feature_gates" not in trained
    assert "feature_gates" in rows[2] and "feature_gates" not in rows[0]
