"""Feature edges (issue 10, part 2): attention transfer between nodes' stage outputs, gated like
the logit edges; the vectorised loss against a plain per-edge loop, the graph's feature gates,
the command line and training on real CIFAR-10 images."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import train_dcl
from timm_dcl.cli import CliError
from timm_dcl.config import TrainConfig
from timm_dcl.features import FeatureEdgeLoss, attention_map, feature_loss_reference, resize_map
from timm_dcl.gates import Gate, encode_gates
from timm_dcl.graph import Graph, Node
from timm_dcl.trainer import GraphTrainer

from conftest import read_metrics

T, C, L, K = "through", "cutoff", "linear", "correct"
GATE_CHOICES = (T, C, L, K)


def _random_case(m, b, shapes, classes=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(b, *shape, generator=g, dtype=dtype) * 3 for shape in shapes]
    logits = [torch.randn(b, classes, generator=g, dtype=dtype) * 4 for _ in range(m)]
    labels = torch.randint(0, classes, (b,), generator=g)
    # make every correct mask mixed: a source right on some samples, wrong on others
    for z in logits:
        z[: b // 2].scatter_(1, labels[: b // 2, None], 50.0)
    codes = [int(Gate.CUTOFF) if s == t else int(torch.randint(0, 4, (), generator=g)) for t in range(m) for s in range(m)]
    return feats, logits, labels, codes


@pytest.mark.parametrize("m,b,shapes", [
    (2, 1, [(4, 8, 8), (6, 8, 8)]),                          # B = 1, widths differ
    (3, 5, [(3, 8, 8), (5, 16, 16), (2, 4, 4)]),             # every size differs: up- and down-sized sources
    (4, 9, [(8, 7, 5), (3, 7, 5), (4, 14, 10), (5, 7, 5)]),  # odd, non-square maps
    (5, 4, [(2, 6, 6)] * 5),
])
@pytest.mark.parametrize("progress", [0.0, 0.37, 1.0])
def test_vectorised_loss_matches_the_per_edge_reference(m, b, shapes, progress):
    for seed in range(3):
        feats, logits, labels, codes = _random_case(m, b, shapes, seed=seed)
        fast_in = [f.clone().requires_grad_() for f in feats]
        ref_in = [f.clone().requires_grad_() for f in feats]
        fast = FeatureEdgeLoss(codes, m, weight=500.0)(fast_in, logits, labels, progress)
        ref = feature_loss_reference(ref_in, logits, labels, codes, 500.0, progress).float()
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
        weights = torch.rand(m, generator=torch.Generator().manual_seed(seed))
        (fast * weights).sum().backward()
        (ref * weights).sum().backward()
        for i, (a, r) in enumerate(zip(fast_in, ref_in)):
            if r.grad is None:
                assert a.grad is None or not a.grad.any(), f"node {i} got a gradient the reference does not give"
            else:
                torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64_and_sources_get_no_gradient():
    m = 3
    codes = encode_gates([[C, T, K], [L, C, C], [C, C, C]])  # node 2 only teaches
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(3, c, h, h, generator=g, dtype=torch.float64) for c, h in ((3, 4), (2, 4), (4, 8))]
    logits = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(m)]
    labels = torch.tensor([0, logits[2][1].argmax().item(), 4])
    loss = FeatureEdgeLoss(codes, m, weight=3.0)

    # Each target's loss against its own features (sources are constants to it: they are detached,
    # so a numerical Jacobian through a source would differ from the analytical one by design).
    for t in (0, 1):
        def f(x, t=t):
            return loss([x if i == t else feats[i] for i in range(m)], logits, labels, 0.4)[t]

        assert torch.autograd.gradcheck(f, (feats[t].clone().requires_grad_(),))
    inputs = (feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_())
    # node 2 is a source only: no gradient reaches it, and a target's loss moves only its own features
    src = feats[2].clone().requires_grad_()
    out = loss([inputs[0], inputs[1], src], logits, labels, 0.4)
    out[0].backward()
    assert src.grad is None and inputs[0].grad.abs().sum() > 0
    assert inputs[1].grad is None or not inputs[1].grad.any()
    ref = feature_loss_reference([feats[0], feats[1], feats[2]], logits, labels, codes, 3.0, 0.4)
    torch.testing.assert_close(out.detach(), ref)


def test_half_precision_and_large_activations_stay_finite():
    feats, logits, labels, codes = _random_case(3, 6, [(4, 8, 8)] * 3, seed=5)
    big = [(f * 1e3).half() for f in feats]  # squares overflow float16: the map is taken in float32
    out = FeatureEdgeLoss(codes, 3, 500.0)(big, [z.half() for z in logits], labels, 0.5)
    ref = feature_loss_reference([f.float() for f in big], [z.float() for z in logits], labels, codes, 500.0, 0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.float(), rtol=1e-3, atol=1e-4)


def test_attention_map_and_resize_definitions():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    torch.testing.assert_close(attention_map(x), (x ** 2).mean(1))
    a = torch.rand(2, 8, 8)
    assert resize_map(a, (8, 8)) is a
    assert resize_map(a, (4, 4)).shape == (2, 4, 4) and resize_map(a, (16, 12)).shape == (2, 16, 12)
    with pytest.raises(ValueError, match="NCHW"):
        attention_map(torch.rand(2, 3, 4))


def test_through_edge_value_by_hand():
    """One through edge, worked by hand: maps equal up to scale give zero; orthogonal maps 2/P."""
    a = torch.zeros(1, 1, 2, 2)
    a[0, 0, 0, 0] = 2.0
    b = torch.zeros(1, 1, 2, 2)
    b[0, 0, 1, 1] = 5.0
    codes = encode_gates([[C, T], [C, C]])
    loss = FeatureEdgeLoss(codes, 2, weight=10.0)
    logits = [torch.zeros(1, 3), torch.zeros(1, 3)]
    out = loss([a, b], logits, torch.tensor([0]))
    assert out[0].item() == pytest.approx(10.0 * 2 / 4) and out[1].item() == 0.0
    assert loss([a, a * 7], logits, torch.tensor([0]))[0].item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------- the graph


def _graph(models=("resnet20", "wrn16_2"), feature_gates=((C, T), (T, C)), **kw) -> Graph:
    return Graph([Node(x) for x in models], [[T] * len(models) for _ in models],
                 feature_gates=[list(r) for r in feature_gates], **kw)


def test_graph_json_round_trip_and_old_files_unchanged(tmp_path):
    g = _graph(feature_stage=2, feature_weight=100)
    d = g.to_dict()
    assert d["feature_gates"] == [[C, T], [T, C]] and d["feature_stage"] == 2 and d["feature_weight"] == 100.0
    assert Graph.load(g.save(tmp_path / "g.json")) == g
    # all cutoff is no feature edge: the file is a logit-only graph's, byte for byte
    plain = Graph.preset("dml", ["resnet20", "wrn16_2"])
    cut = dataclasses.replace(plain, feature_gates=[[C, C], [C, C]])
    assert cut.to_dict() == plain.to_dict() and "feature_gates" not in plain.to_dict()
    assert Graph.from_dict(json.loads(json.dumps(plain.to_dict()))).feature_gates is None
    assert g.feature_nodes == (0, 1) and "feature gates" in g.describe()


@pytest.mark.parametrize("nodes,feature_gates,match", [
    (["resnet20", "resnet20"], [[T, C], [C, C]], r"feature_gates\[0\]\[0\]: the diagonal must be cutoff"),
    (["resnet20", "resnet20", "ensemble"], [[C, C, C], [C, C, C], [T, C, C]], r"feature_gates\[2\]: node 2 is an ensemble"),
    (["resnet20", "resnet20", "ensemble"], [[C, C, T], [C, C, C], [C, C, C]], r"feature_gates\[0\]\[2\]: node 2 is an ensemble, which has no features"),
    (["resnet20", "resnet20"], [[C, T]], r"feature_gates has 1 rows but the graph has 2 nodes"),
    (["resnet20", "resnet20"], [[C, "thru"], [C, C]], r"unknown gate 'thru' at feature_gates\[0\]\[1\] \(did you mean 'through'\?\)"),
])
def test_bad_feature_gates_get_clear_errors(nodes, feature_gates, match):
    m = len(nodes)
    gates = [[C] * m if x == "ensemble" else [T] * m for x in nodes]
    with pytest.raises(ValueError, match=match):
        Graph([Node(x) for x in nodes], gates, feature_gates=feature_gates)


def test_frozen_node_only_teaches(tmp_path):
    with pytest.raises(ValueError, match=r"feature_gates\[1\]: node 1 is frozen"):
        Graph([Node("resnet20"), Node("resnet20", checkpoint="t.pth")], [[T, T], [C, C]],
              feature_gates=[[C, C], [T, C]])
    g = Graph([Node("resnet20"), Node("resnet20", checkpoint="t.pth")], [[T, T], [C, C]],
              feature_gates=[[C, T], [C, C]])
    assert g.nodes[1].frozen and g.feature_nodes == (0, 1)


@pytest.mark.parametrize("weight,stage,match", [
    (-1.0, -1, "feature_weight: must be finite and ≥ 0"), (float("nan"), -1, "feature_weight"),
    (1.0, 1.5, "feature_stage: expected an integer"),
])
def test_bad_feature_settings(weight, stage, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _graph(feature_weight=weight, feature_stage=stage)


# ------------------------------------------------------------------------------- the command line


def _cli_error(argv, capsys) -> str:
    try:
        code = train_dcl.main(argv)
    except SystemExit as e:  # argparse's own errors exit; ours return the status
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train_dcl.py: error: "), err
    return err


@pytest.mark.parametrize("extra,match", [
    (["--feature-gates", "through,through;through,cutoff"], "--feature-gates: feature_gates[0][0]: the diagonal"),
    (["--feature-gates", "cutoff,through"], "--feature-gates: gates has 1 rows but the graph has 2 nodes"),
    (["--feature-weight", "10"], "--feature-weight without feature edges does nothing"),
    (["--feature-stage", "1"], "--feature-stage without feature edges does nothing"),
    (["--feature-gates", "cutoff,through;through,cutoff", "--feature-stage", "9"],
     "node 0 (resnet20) cannot give the features of stage 9 (--feature-stage)"),
])
def test_command_line_errors_are_one_line(extra, match, capsys, tmp_path, cifar10):
    argv = ["--node-models", "resnet20,wrn16_2", "--dataset", "cifar10", "--data-dir", cifar10,
            "--epochs", "1", "--output", str(tmp_path / "run"), *extra]
    assert match in _cli_error(argv, capsys)


class _NoIntermediates(nn.Module):
    """A timm-registered model with no forward_intermediates (a user's own network)."""

    def __init__(self, num_classes=10, **kw):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_model_without_forward_intermediates_is_refused(capsys, tmp_path, cifar10):
    import timm
    from timm.models import register_model

    name = "test_features_no_intermediates"
    if not timm.is_model(name):
        @register_model
        def test_features_no_intermediates(pretrained=False, **kwargs):  # noqa: ANN001
            kwargs.pop("pretrained_cfg", None)
            kwargs.pop("pretrained_cfg_overlay", None)
            kwargs.pop("cache_dir", None)
            return _NoIntermediates(**kwargs)

    argv = ["--node-models", f"resnet20,{name}", "--feature-gates", "cutoff,through;through,cutoff",
            "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "1", "--output", str(tmp_path / "run")]
    err = _cli_error(argv, capsys)
    assert f"node 1 ({name}) has no forward_intermediates" in err
    # the same model in a graph without feature edges is fine as far as features go
    g = Graph([Node("resnet20"), Node(name)], [[T, T], [T, T]], feature_gates=[[C, T], [C, C]])
    assert g.feature_nodes == (0, 1)


# ------------------------------------------------------------------------------- training


def _cfg(cifar10, tmp_path=None, **kw) -> TrainConfig:
    base = dict(dataset="cifar10", data_dir=cifar10, train_subset=64, eval_subset=48, epochs=1, batch_size=16,
                workers=0, progress_bar=False, seed=7, edge_stats_every=0,
                output=str(tmp_path) if tmp_path is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def _states(trainer):
    return [{k: v.clone() for k, v in n.raw.state_dict().items()} for n in trainer.nodes if not n.is_ensemble]


def test_cifar_resnet_and_wrn_train_through_feature_edges(tmp_path, cifar10):
    """Different widths (16·k vs 32 channels), the same stage sizes; every gate kind on an edge."""
    graph = Graph([Node("resnet20"), Node("wrn16_2"), Node("resnet20")], [[T] * 3] * 3,
                  feature_gates=[[C, T, K], [L, C, C], [T, T, C]])
    trainer = GraphTrainer(graph, _cfg(cifar10, tmp_path / "run", epochs=2))
    # a step's losses are the logit losses plus the feature losses, and only the latter change with them
    images, labels = next(iter(trainer.train_loader))
    with torch.no_grad():
        logits, total, feat = trainer._forward_loss(images, labels, 0.5)
        plain = trainer.loss_fn(logits, labels, progress=0.5)
        inputs = trainer._inputs(images)
        fs = [n.train_model(inputs[n.norm_key])[1] for n in trainer.nodes]
    torch.testing.assert_close(total, plain + feat)
    torch.testing.assert_close(feat, feature_loss_reference(fs, logits, labels, graph.feature_gate_codes,
                                                            500.0, 0.5).float(), rtol=1e-4, atol=1e-5)
    assert (feat > 0).all()
    result = trainer.fit()
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2 and all(len(r["feature_loss"]) == 3 for r in records)
    assert all(v > 0 for r in records for v in r["feature_loss"])
    assert all(t >= f for r in records for t, f in zip(r["train_loss"], r["feature_loss"]))
    assert torch.isfinite(torch.tensor(result.history[-1]["train_loss"])).all()
    saved = json.loads((tmp_path / "run" / "graph.json").read_text())
    assert saved["feature_gates"] == graph.feature_gates
    # the weights files are the plain models' (no wrapper in their keys)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=False)
    assert all(not k.startswith("model.") for k in state["models"][1])


def test_maps_of_different_sizes_train(tmp_path, cifar10):
    """Stage 1 of the CIFAR ResNet is 32×32, of timm's resnet18 (layer1, after the stem's stride 4) 8×8:
    each map is resized to the other's size."""
    graph = Graph([Node("resnet20"), Node("resnet18")], [[T, T], [T, T]],
                  feature_gates=[[C, T], [T, C]], feature_stage=1)
    trainer = GraphTrainer(graph, _cfg(cifar10))
    images, labels = next(iter(trainer.train_loader))
    inputs = trainer._inputs(images)
    with torch.no_grad():
        sizes = [tuple(n.train_model(inputs[n.norm_key])[1].shape[-2:]) for n in trainer.nodes]
    assert sizes == [(32, 32), (8, 8)]
    before = _states(trainer)
    result = trainer.fit()
    assert all(v > 0 for v in result.history[-1]["feature_loss"])
    for old, n in zip(before, trainer.nodes):
        new = n.raw.state_dict()
        assert any(not torch.equal(old[k], new[k]) for k in old if new[k].is_floating_point())


def test_feature_edges_move_the_weights_and_zero_weight_is_the_logit_only_run(cifar10):
    """All-cutoff feature gates, or open ones at weight 0, give bit-identically the logit-only
    run (the feature path changes no logit); weight 500 changes the weights."""
    plain = Graph.preset("dml", ["resnet20", "wrn16_2"])
    runs = {}
    for name, graph in (("plain", plain),
                        ("cutoff", dataclasses.replace(plain, feature_gates=[[C, C], [C, C]])),
                        ("zero", dataclasses.replace(plain, feature_gates=[[C, T], [T, C]], feature_weight=0.0)),
                        ("at", dataclasses.replace(plain, feature_gates=[[C, T], [T, C]]))):
        trainer = GraphTrainer(graph, _cfg(cifar10, train_subset=32, eval_subset=32))
        result = trainer.fit()
        runs[name] = (result.history[-1], _states(trainer))
    for name in ("cutoff", "zero"):
        record, states = runs[name]
        assert record["top1"] == runs["plain"][0]["top1"]
        assert record["train_loss"] == runs["plain"][0]["train_loss"]
        for a, b in zip(states, runs["plain"][1]):
            assert all(torch.equal(a[k], b[k]) for k in a), name
    assert "feature_loss" not in runs["cutoff"][0] and runs["zero"][0]["feature_loss"] == [0.0, 0.0]
    changed = [any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
               for a, b in zip(runs["at"][1], runs["plain"][1])]
    assert all(changed)


def test_frozen_teacher_teaches_through_a_feature_edge(tmp_path, cifar10):
    teacher = tmp_path / "teacher.pth"
    import timm
    from timm_dcl import models  # noqa: F401
    torch.save(timm.create_model("resnet20", num_classes=10).state_dict(), teacher)
    graph = Graph([Node("resnet20"), Node("resnet20", checkpoint=str(teacher))], [[T, T], [C, C]],
                  feature_gates=[[C, T], [C, C]])
    trainer = GraphTrainer(graph, _cfg(cifar10))
    frozen_before = _states(trainer)[1]
    result = trainer.fit()
    assert result.history[-1]["feature_loss"][0] > 0 and result.history[-1]["feature_loss"][1] == 0.0
    after = trainer.nodes[1].raw.state_dict()
    assert all(torch.equal(frozen_before[k], after[k]) for k in after)


def test_command_line_run_and_graph_file_override(tmp_path, cifar10):
    out = tmp_path / "run"
    assert train_dcl.main(["--node-models", "resnet20,wrn16_2", "--feature-gates", "cutoff,linear;correct,cutoff",
                           "--feature-weight", "100", "--dataset", "cifar10", "--data-dir", cifar10,
                           "--train-subset", "32", "--eval-subset", "32", "--batch-size", "16", "--epochs", "1",
                           "--workers", "0", "--no-progress", "--output", str(out)]) == 0
    saved = Graph.load(out / "graph.json")
    assert saved.feature_gates == [[C, L], [K, C]] and saved.feature_weight == 100.0
    assert (out / "graph.png").is_file() or (out / "graph.svg").is_file()
    from timm_dcl.cli import graph_from_args
    from train_dcl import build_parser
    args = build_parser().parse_args(["--graph", str(out / "graph.json"), "--feature-weight", "5",
                                      "--feature-stage", "2"])
    g = graph_from_args(args)
    assert g.feature_weight == 5.0 and g.feature_stage == 2 and g.feature_gates == saved.feature_gates
    with pytest.raises(CliError, match="--feature-gates"):
        graph_from_args(build_parser().parse_args(["--graph", str(out / "graph.json"), "--feature-gates", "x"]))
