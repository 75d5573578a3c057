"""Edge diagnostics (metrics.jsonl ``edge_*`` fields, edges.png): shapes, ranges, nulls for cutoff
edges, and values equal to a plain per-edge computation on the batches the trainer sampled."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from timm_dcl.config import TrainConfig
from timm_dcl.edge_stats import EdgeStats, edge_losses
from timm_dcl.gates import Gate, encode_gates
from timm_dcl.graph import Graph, Node
from timm_dcl.trainer import GraphTrainer

T, C, L, K = "through", "cutoff", "linear", "correct"
GATES = [[T, C, L], [K, T, T], [T, K, C]]  # a correct gate on the diagonal of node 2 is through there
TEMPERATURE = 2.0


def _plain_edge_loss(logits, labels, t: int, s: int, temperature: float) -> torch.Tensor:
    """SPEC §2, one edge at a time: CE with the label on the diagonal, T²·KL(p_s || p_t) elsewhere."""
    if s == t:
        return F.cross_entropy(logits[t].float(), labels, reduction="none")
    log_q = F.log_softmax(logits[t].float() / temperature, dim=1)
    log_p = F.log_softmax(logits[s].float() / temperature, dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(1) * temperature ** 2


def _plain_record(batches, gates, temperature):
    """The epoch's fields computed edge by edge from (logits, labels, progress) of each sampled batch."""
    m = len(gates)
    loss = [[0.0] * m for _ in range(m)]
    right = [0.0] * m
    for logits, labels, _ in batches:
        for t in range(m):
            for s in range(m):
                loss[t][s] += float(_plain_edge_loss(logits, labels, t, s, temperature).mean()) / len(batches)
        for s in range(m):
            right[s] += float((logits[s].argmax(1) == labels).float().mean()) / len(batches)
    progress = sum(p for _, _, p in batches) / len(batches)
    return {
        "edge_loss": [[None if gates[t][s] == C else loss[t][s] for s in range(m)] for t in range(m)],
        "edge_kept": [[None if gates[t][s] == C else (1.0 if s == t else right[s]) for s in range(m)]
                      for t in range(m)],
        "edge_weight": [[None if gates[t][s] == C else (progress if gates[t][s] == L else 1.0) for s in range(m)]
                        for t in range(m)],
    }


def _assert_fields_close(got: dict, want: dict) -> None:
    for key in want:
        for t, (row_got, row_want) in enumerate(zip(got[key], want[key])):
            for s, (a, b) in enumerate(zip(row_got, row_want)):
                if b is None:
                    assert a is None, (key, t, s, a)
                else:
                    assert a == pytest.approx(b, rel=1e-4, abs=1e-5), (key, t, s, a, b)


def test_edge_losses_match_a_plain_per_edge_computation():
    torch.manual_seed(0)
    m, b, c = 3, 16, 7
    logits = [torch.randn(b, c) * 3 for _ in range(m)]
    logits[1][0] = 0.0  # a tie: argmax takes the lowest index
    labels = torch.randint(0, c, (b,))
    labels[0] = 0
    loss, correct = edge_losses(logits, labels, TEMPERATURE)
    assert loss.shape == (m, m, b) and correct.shape == (m, b)
    for t in range(m):
        for s in range(m):
            torch.testing.assert_close(loss[t, s], _plain_edge_loss(logits, labels, t, s, TEMPERATURE),
                                       rtol=1e-4, atol=1e-5)
    assert bool(correct[1, 0])
    assert torch.equal(correct, torch.stack([z.argmax(1) == labels for z in logits]))


def test_edge_stats_record_on_known_batches():
    torch.manual_seed(1)
    codes = encode_gates(GATES, 3)
    stats = EdgeStats(codes, 3, TEMPERATURE, "cpu")
    assert stats.record() == {}  # nothing sampled: no fields
    batches = []
    for progress in (0.25, 0.5):
        logits = [torch.randn(8, 5) for _ in range(3)]
        labels = torch.randint(0, 5, (8,))
        stats.add(logits, labels, progress)
        batches.append((logits, labels, progress))
    record = stats.record()
    assert record["edge_batches"] == 2
    _assert_fields_close(record, _plain_record(batches, GATES, TEMPERATURE))
    assert record["edge_weight"][0][2] == pytest.approx(0.375)  # the linear edge: mean k/K of the sample
    assert Gate.CUTOFF == codes[1] and record["edge_loss"][0][1] is None


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory, shared_data):
    """3 nodes, 3 iterations per epoch, diagnostics from batches 0 and 2 of each epoch."""
    out = tmp_path_factory.mktemp("edges")
    cfg = TrainConfig(dataset="cifar10", data_dir=str(shared_data / "cifar10"), train_subset=96, eval_subset=20,
                      batch_size=32, epochs=2, workers=0, progress_bar=False, seed=0, edge_stats_every=2,
                      output=str(out))
    nodes = [Node("resnet20", model_kwargs={"depth": 8}) for _ in range(3)]  # small: the edges are under test
    trainer = GraphTrainer(Graph(nodes, GATES, temperature=TEMPERATURE), cfg)
    seen = []
    loss_fn = trainer.loss_fn

    def watched(logits, labels, progress):
        seen.append(([z.detach().clone() for z in logits], labels.clone(), float(progress)))
        return loss_fn(logits, labels, progress=progress)

    trainer.loss_fn = watched
    trainer.fit()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, seen, out


def test_run_records_edge_fields_with_shapes_ranges_and_nulls(edge_run):
    metrics, _, out = edge_run
    assert len(metrics) == 2
    for r in metrics:
        assert r["edge_batches"] == 2  # batches 0 and 2 of 3
        for key in ("edge_loss", "edge_kept", "edge_weight"):
            assert len(r[key]) == 3 and all(len(row) == 3 for row in r[key])
            for t in range(3):
                for s in range(3):
                    v = r[key][t][s]
                    if GATES[t][s] == C:
                        assert v is None, (key, t, s)
                        continue
                    assert isinstance(v, float)
                    if key == "edge_loss":
                        assert v >= 0
                    elif key == "edge_kept":
                        assert 0 <= v <= 1
                    else:
                        assert 0 < v <= 1
        assert r["edge_kept"][0][0] == r["edge_kept"][1][1] == 1.0  # the label edge: the source is the label
        assert r["edge_loss"][2][2] is None  # node 2's label edge is cut off
        assert r["edge_weight"][1][1] == r["edge_weight"][1][0] == 1.0  # through, correct
    assert metrics[1]["edge_weight"][0][2] > metrics[0]["edge_weight"][0][2]  # the linear gate rises
    assert (out / "edges.png").stat().st_size > 0


def test_run_values_equal_a_plain_computation_on_the_sampled_batches(edge_run):
    metrics, seen, _ = edge_run
    assert len(seen) == 6
    for epoch, r in enumerate(metrics):
        sampled = [seen[epoch * 3], seen[epoch * 3 + 2]]
        _assert_fields_close(r, _plain_record(sampled, GATES, TEMPERATURE))


def test_edge_stats_every_zero_records_nothing(shared_data):
    cfg = TrainConfig(dataset="cifar10", data_dir=str(shared_data / "cifar10"), train_subset=32, eval_subset=20,
                      batch_size=32, epochs=1, workers=0, progress_bar=False, edge_stats_every=0)
    nodes = [Node("resnet20", model_kwargs={"depth": 8}) for _ in range(2)]
    result = GraphTrainer(Graph(nodes, [[T, T], [T, T]]), cfg).fit()
    assert not any(k.startswith("edge_") for k in result.history[0])
    with pytest.raises(ValueError, match="--edge-stats-every must be ≥ 0"):
        TrainConfig(edge_stats_every=-1)
