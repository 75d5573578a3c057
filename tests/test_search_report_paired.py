"""The report's paired comparisons: differences by seed, Student-t intervals, verdicts, extra
graphs from JSON files, --report-vs, and seeds added later (stand-in trainer, as in
test_search_report.py; the real trainer's pairing guarantee is tests/test_pairing.py)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

import test_search_report as base
from test_search_report import CFG, EPOCHS, study, trainer  # noqa: F401  (fixtures)
from timm_dcl.graph import Graph, Node
from timm_dcl.search import ReportSettings, run_report
from timm_dcl.search.stats import paired_difference, t_quantile, verdict

T, C = "through", "cutoff"
INDEPENDENT = "through,cutoff,cutoff;cutoff,through,cutoff;cutoff,cutoff,through"
DML = ";".join(["through,through,through"] * 3)
#: node 0's last-epoch top-1 by graph (gates text; "alone" = the one-node extra graph) and seed
KNOWN = {INDEPENDENT: {3: 50.0, 4: 52.0, 5: 51.0},
         DML: {3: 53.0, 4: 53.5, 5: 55.0},
         "through": {3: 49.0, 4: 52.5, 5: 50.0}}


@pytest.fixture
def known(monkeypatch):
    def top1(gates, seed, epoch):
        key = ";".join(",".join(row) for row in gates)
        return KNOWN.get(key, {}).get(seed, 40.0 + seed) if epoch == EPOCHS else 0.0
    monkeypatch.setattr(base, "fake_top1", top1)


def _alone(tmp_path: Path) -> Path:
    path = tmp_path / "alone.json"
    Graph([Node("resnet20")], [[T]]).save(path)
    return path


def test_t_quantiles_match_the_tables():
    for df, ref in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (120, 1.9799)):
        assert t_quantile(0.975, df) == pytest.approx(ref, abs=1e-4)
    assert t_quantile(0.95, 7) == pytest.approx(1.8946, abs=1e-4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_quantile(0.975, bad)


def test_paired_difference_uses_the_seeds_both_have():
    e = paired_difference([1.0, 2.0, 3.0, None], [0.0, 0.0, 1.0, 5.0])
    diffs = [1.0, 2.0, 2.0]
    half = t_quantile(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert e["n"] == 3 and e["diff"] == pytest.approx(5 / 3)
    assert e["ci"] == pytest.approx([5 / 3 - half, 5 / 3 + half]) and verdict(e) == "better"
    one = paired_difference([1.0, None], [0.5, 2.0])
    assert one == {"diff": 0.5, "ci": None, "n": 1} and verdict(one) is None
    assert paired_difference([None], [1.0]) == {"diff": None, "ci": None, "n": 0}
    assert verdict({"ci": [0.1, 2.0]}) == "better" and verdict({"ci": [-3.0, -0.2]}) == "worse"


def test_known_runs_give_the_known_differences_and_intervals(study, trainer, known, tmp_path):  # noqa: F811
    study, space = study
    settings = ReportSettings(top=0, seeds=3, graphs=(("alone", str(_alone(tmp_path))),))
    report = run_report(study, space, CFG, tmp_path, settings, load_data=lambda: "DATA", say=lambda m: None)
    rows = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert list(rows) == ["independent", "dml", "alone"] and report["vs"] == ["independent", "dml", "alone"]
    dml, ind, alone = rows["dml"], rows["independent"], rows["alone"]
    assert dml["top1"] == [53.0, 53.5, 55.0] and ind["top1"] == [50.0, 52.0, 51.0]
    # dml − independent: 3, 1.5, 4 → mean 2.8333, sd 1.2583, t(0.975, 2) = 4.3027
    d = [3.0, 1.5, 4.0]
    half = 4.302652729749411 * statistics.stdev(d) / math.sqrt(3)
    assert dml["vs"]["independent"]["n"] == 3
    assert dml["vs"]["independent"]["diff"] == pytest.approx(statistics.fmean(d))
    assert dml["vs"]["independent"]["ci"] == pytest.approx([statistics.fmean(d) - half, statistics.fmean(d) + half])
    assert dml["vs"]["independent"]["verdict"] == "tie"  # −0.29 … +5.96 contains 0
    # dml − alone: 4, 1, 5 ; independent − alone: 1, −0.5, 1
    assert dml["vs"]["alone"]["diff"] == pytest.approx(10 / 3)
    assert ind["vs"]["dml"]["diff"] == pytest.approx(-statistics.fmean(d))
    assert ind["vs"]["dml"]["ci"] == pytest.approx([-statistics.fmean(d) - half, -statistics.fmean(d) + half])
    # no row is compared with itself
    assert all(r["name"] not in r["vs"] for r in rows.values())
    # the extra graph: trained as its file says, under its own run folder, listed with its file
    assert alone["models"] == "resnet20" and alone["gates"] == "through" and alone["graph_file"].endswith("alone.json")
    assert all((tmp_path / run / "graph.json").is_file() for run in alone["runs"])
    assert Graph.load(tmp_path / alone["runs"][0] / "graph.json").num_nodes == 1
    md = (tmp_path / "report.md").read_text()
    assert "| vs independent | vs dml | vs alone |" in md
    lo, hi = dml["vs"]["independent"]["ci"]
    assert f"+2.83 [{lo:+.2f}, {hi:+.2f}] tie" in md
    assert (tmp_path / "report.png").stat().st_size > 0


def test_a_clear_difference_is_better_or_worse(study, trainer, monkeypatch, tmp_path):  # noqa: F811
    study, space = study
    monkeypatch.setitem(KNOWN, DML, {3: 55.0, 4: 57.1, 5: 55.9})  # +5, +5.1, +4.9 over independent
    monkeypatch.setattr(base, "fake_top1", lambda gates, seed, epoch: KNOWN.get(
        ";".join(",".join(r) for r in gates), {}).get(seed, 40.0))
    run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=3, vs=("independent",)),
               load_data=lambda: "DATA", say=lambda m: None)
    rows = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert rows["dml"]["vs"]["independent"]["verdict"] == "better" and list(rows["dml"]["vs"]) == ["independent"]
    assert rows["independent"]["vs"] == {}
    md = (tmp_path / "report.md").read_text()
    assert "+5.00 [" in md and "] better" in md and "| vs independent |" in md and "| vs dml |" not in md


def test_one_seed_gets_no_interval(study, trainer, known, tmp_path):  # noqa: F811
    study, space = study
    run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=1), load_data=lambda: "DATA",
               say=lambda m: None)
    rows = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    entry = rows["dml"]["vs"]["independent"]
    assert entry == {"diff": 3.0, "ci": None, "n": 1, "verdict": None}
    assert "+3.00 (n = 1)" in (tmp_path / "report.md").read_text()


def test_more_seeds_later_train_only_the_new_seeds_and_a_rerun_trains_nothing(study, trainer, known,  # noqa: F811
                                                                               tmp_path):
    study, space = study
    extra = (("alone", str(_alone(tmp_path))),)
    run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=2, graphs=extra), load_data=lambda: "DATA",
               say=lambda m: None)
    assert len(trainer) == 3 * 2
    before = json.loads((tmp_path / "report.json").read_text())
    assert before[1]["vs"]["independent"]["n"] == 2
    trainer.clear()
    report = run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=3, graphs=extra),
                        load_data=lambda: "DATA", say=lambda m: None)
    assert report["trained"] == 3 and sorted(c["seed"] for c in trainer) == [5, 5, 5]
    after = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert after["dml"]["vs"]["independent"]["n"] == 3 and after["dml"]["top1"] == [53.0, 53.5, 55.0]
    trainer.clear()

    def no_data():
        raise AssertionError("a report with every run done loads no data")
    again = run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=3, graphs=extra),
                       load_data=no_data, say=lambda m: None)
    assert again["trained"] == 0 and trainer == []


def test_bad_extra_graphs_and_comparisons_are_clear_errors(study, trainer, tmp_path):  # noqa: F811
    study, space = study
    alone = str(_alone(tmp_path))
    with pytest.raises(ValueError, match="already a row of this report"):
        run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=1, graphs=(("dml", alone),)),
                   load_data=lambda: "DATA", say=lambda m: None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=1, graphs=(("x", str(tmp_path / "no.json")),)),
                   load_data=lambda: "DATA", say=lambda m: None)
    with pytest.raises(ValueError, match="--report-vs: no row named 'kd'"):
        run_report(study, space, CFG, tmp_path, ReportSettings(top=0, seeds=1, vs=("kd",)),
                   load_data=lambda: "DATA", say=lambda m: None)
    for graphs, match in (((("a b", alone),), "not a usable name"), ((("searched", alone),), "not a usable name"),
                          ((("a", alone), ("a", alone)), "given twice")):
        with pytest.raises(ValueError, match=match):
            ReportSettings(graphs=graphs)
    assert trainer == []  # every error came before any training


@pytest.mark.parametrize("argv, match", [
    (["--report-graphs", "alone"], "--report-graphs takes NAME=FILE"),
    (["--report-vs", "dml"], "need --report"),
])
def test_report_flags_are_one_line_errors(argv, match, capsys, tmp_path):
    import search_dcl
    extra = [] if "--report-vs" in argv else ["--report"]
    code = search_dcl.main(["--num-nodes", "2", "--target-model", "resnet20", "--candidates", "resnet20",
                            "--dataset", "cifar10", "--output", str(tmp_path), *extra, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("search_dcl.py: error:") and match in err[0], err
