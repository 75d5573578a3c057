"""The graph description (validation, presets, JSON, CLI form) and its drawing."""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest

from timm_dcl.draw import _FROZEN_FILL, _NODE_FILL, _TARGET_FILL, GATE_STYLES, draw_graph
from timm_dcl.gates import Gate
from timm_dcl.graph import Graph, Node

T, C, L, K = "through", "cutoff", "linear", "correct"


def _dcl3() -> Graph:
    """The paper's 3-node DCL shape: ResNet32, ResNet110, a frozen ResNet32."""
    return Graph(
        [Node("resnet32"), Node("resnet110", {"drop_rate": 0.1}), Node("resnet32", checkpoint="runs/r32/best.pth")],
        [[T, K, L], [T, T, C], [C, C, C]],
        temperature=2.0,
    )


# ---------------------------------------------------------------- structure and properties

def test_properties():
    g = _dcl3()
    assert g.num_nodes == 3
    assert g.nodes[2].frozen  # inferred: checkpoint + all-cutoff row
    assert g.frozen_nodes == (2,) and g.trainable_nodes == (0, 1)
    assert g.gate_codes == (Gate.THROUGH, Gate.CORRECT, Gate.LINEAR, Gate.THROUGH, Gate.THROUGH,
                            Gate.CUTOFF, Gate.CUTOFF, Gate.CUTOFF, Gate.CUTOFF)


def test_gates_canonicalised_and_caller_nodes_untouched():
    teacher = Node("resnet110", checkpoint="t.pth")
    g = Graph([Node("resnet32"), teacher], [["Through", Gate.LINEAR], [1, "CUTOFF"]])
    assert g.gates == [[T, L], [C, C]]
    assert g.nodes[1].frozen and not teacher.frozen  # the graph copies its nodes


def test_trainable_node_may_warm_start_from_a_checkpoint():
    g = Graph([Node("resnet32"), Node("resnet32", checkpoint="w.pth")], [[T, T], [T, T]])
    assert g.frozen_nodes == () and g.nodes[1].checkpoint == "w.pth"


def test_single_node():
    g = Graph([Node("resnet32")], [[T]])
    assert g.num_nodes == 1 and g.trainable_nodes == (0,)


def test_describe():
    text = _dcl3().describe()
    assert "3 nodes" in text and "T=2" in text
    lines = text.splitlines()
    assert any("resnet110" in ln and "drop_rate" in ln for ln in lines)
    frozen_line = next(ln for ln in lines if "runs/r32/best.pth" in ln)
    assert "frozen" in frozen_line and frozen_line.split()[0] == "2"
    assert "target" in next(ln for ln in lines if ln.split()[:1] == ["0"] and "resnet32" in ln)
    assert lines[-1].split() == ["2", C, C, C]
    assert lines[-3].split() == ["0", T, K, L]


# ---------------------------------------------------------------- validation errors

@pytest.mark.parametrize("nodes,gates,temperature,exc,match", [
    ([], [], 1.0, ValueError, r"at least one node"),
    ([Node("resnet32")], [[T, T]], 1.0, ValueError, r"row 0 has 2 entries"),
    ([Node("resnet32"), Node("resnet32")], [[T, T]], 1.0, ValueError, r"gates has 1 rows but the graph has 2 nodes"),
    ([Node("resnet32"), Node("resnet32")], [[T, T], ["thru", T]], 1.0, ValueError,
     r"unknown gate 'thru' at gates\[1\]\[0\] \(did you mean 'through'\?\)"),
    ([Node("resnet32")], [[T]], 0.0, ValueError, r"temperature: must be finite and > 0"),
    ([Node("resnet32")], [[T]], -1.0, ValueError, r"temperature: must be finite and > 0"),
    ([Node("resnet32")], [[T]], math.inf, ValueError, r"temperature: must be finite and > 0"),
    ([Node("resnet32")], [[T]], math.nan, ValueError, r"temperature: must be finite and > 0"),
    ([Node("resnet32")], [[T]], "2", TypeError, r"temperature: expected a number, got str"),
    ([Node("resnet32")], [[T]], True, TypeError, r"temperature: expected a number, got bool"),
    ([Node("")], [[T]], 1.0, ValueError, r"nodes\[0\]\.model: expected a non-empty model name"),
    ([Node(32)], [[T]], 1.0, TypeError, r"nodes\[0\]\.model: expected a string, got int"),
    ([Node("resnet32", model_kwargs=[1])], [[T]], 1.0, TypeError, r"nodes\[0\]\.model_kwargs: expected a dict"),
    ([Node("resnet32", model_kwargs={1: 2})], [[T]], 1.0, TypeError, r"nodes\[0\]\.model_kwargs: keys must be strings"),
    ([Node("resnet32", model_kwargs={"num_classes": 10})], [[T]], 1.0, ValueError,
     r"nodes\[0\]\.model_kwargs: 'num_classes' is set by the trainer"),
    ([Node("resnet32", model_kwargs={"act": object()})], [[T]], 1.0, TypeError,
     r"nodes\[0\]\.model_kwargs: must be JSON-serialisable"),
    ([Node("resnet32", checkpoint=3)], [[T]], 1.0, TypeError, r"nodes\[0\]\.checkpoint: expected a path string or None"),
    ([Node("resnet32", checkpoint=" ")], [[T]], 1.0, ValueError, r"nodes\[0\]\.checkpoint: expected a non-empty path"),
    ([Node("resnet32", frozen="yes")], [[T]], 1.0, TypeError, r"nodes\[0\]\.frozen: expected a bool"),
    ([Node("resnet32", checkpoint="a.pth", frozen=True)], [[C]], 1.0, ValueError,
     r"nodes\[0\]\.frozen: node 0 is the target and can never be frozen"),
    ([Node("resnet32", checkpoint="a.pth")], [[C]], 1.0, ValueError,
     r"gates\[0\]: node 0 \(the target\) has an all-cutoff gate row"),
    ([Node("resnet32"), Node("resnet110", frozen=True)], [[T, T], [C, C]], 1.0, ValueError,
     r"nodes\[1\]\.checkpoint: node 1 is frozen, so it needs a checkpoint"),
    ([Node("resnet32"), Node("resnet110", checkpoint="t.pth", frozen=True)], [[T, T], [C, L]], 1.0, ValueError,
     r"gates\[1\]: node 1 is frozen .* must be all cutoff, but gates\[1\]\[1\] is 'linear'"),
    ([Node("resnet32"), Node("resnet110")], [[T, T], [C, C]], 1.0, ValueError,
     r"gates\[1\]: node 1 has an all-cutoff gate row, so it learns nothing: give it a checkpoint"),
])
def test_validation_errors(nodes, gates, temperature, exc, match):
    with pytest.raises(exc, match=match):
        Graph(nodes, gates, temperature)


def test_nodes_must_be_node_objects():
    with pytest.raises(TypeError, match=r"nodes\[1\]: expected a Node, got dict"):
        Graph([Node("resnet32"), {"model": "resnet32"}], [[T, T], [T, T]])
    with pytest.raises(TypeError, match=r"nodes: expected a list of Node, got str"):
        Graph("resnet32", [[T]])


def test_validate_again_after_mutation():
    g = _dcl3()
    g.temperature = -2
    with pytest.raises(ValueError, match="temperature"):
        g.validate()
    g.temperature = 4
    g.nodes[1].model_kwargs["pretrained"] = True
    with pytest.raises(ValueError, match=r"nodes\[1\]\.model_kwargs: 'pretrained'"):
        g.validate()
    del g.nodes[1].model_kwargs["pretrained"]
    assert g.validate() is g and g.temperature == 4.0


def test_check_models():
    assert _dcl3().check_models().num_nodes == 3
    Graph([Node("resnet18"), Node("wrn28_2"), Node("resnet18.a1_in1k")], [[T] * 3] * 3).check_models()
    with pytest.raises(ValueError, match=r"nodes\[1\]\.model: unknown timm model 'resnet3'; close matches: .*resnet32"):
        Graph([Node("resnet32"), Node("resnet3")], [[T, T], [T, T]]).check_models()
    with pytest.raises(ValueError, match=r"nodes\[0\]\.model: unknown timm model 'zzzzqqq'$"):
        Graph([Node("zzzzqqq")], [[T]]).check_models()


# ---------------------------------------------------------------- presets and the CLI form

def test_preset_independent():
    g = Graph.preset("independent", ["resnet32", "wrn28_2", "resnet110"])
    assert g.gates == [[T, C, C], [C, T, C], [C, C, T]] and g.temperature == 1.0
    assert g.frozen_nodes == ()


def test_preset_dml():
    g = Graph.preset("DML", ["resnet32"] * 4, temperature=3)
    assert g.gates == [[T] * 4] * 4 and g.temperature == 3.0


def test_preset_kd():
    g = Graph.preset("kd", ["resnet32", "resnet110"], checkpoints=[None, "teacher.pth"])
    assert g.gates == [[T, T], [C, C]] and g.temperature == 2.0
    assert g.frozen_nodes == (1,) and g.nodes[1].checkpoint == "teacher.pth"
    assert Graph.preset("kd", ["resnet32", "resnet110"], checkpoints=[None, "t.pth"], temperature=4).temperature == 4.0
    with pytest.raises(ValueError, match=r"preset 'kd': node 1 \(the frozen teacher\) needs a checkpoint"):
        Graph.preset("kd", ["resnet32", "resnet110"])
    with pytest.raises(ValueError, match=r"'kd' needs exactly 2 models"):
        Graph.preset("kd", ["resnet32", "resnet110", "resnet32"], checkpoints=[None, "a", "b"])


def test_preset_errors():
    with pytest.raises(ValueError, match=r"unknown preset 'dlm' \(did you mean 'dml'\?\)"):
        Graph.preset("dlm", ["resnet32"])
    with pytest.raises(ValueError, match=r"models: a graph needs at least one model"):
        Graph.preset("dml", [])
    with pytest.raises(TypeError, match=r"models: expected a list"):
        Graph.preset("dml", "resnet32")
    with pytest.raises(ValueError, match=r"checkpoints: got 1 entries for 2 nodes"):
        Graph.preset("dml", ["resnet32", "resnet32"], checkpoints=["a"])


def test_from_cli_gates_and_checkpoint_slots():
    g = Graph.from_cli(["resnet32", "resnet110", "resnet32"], "through,correct,linear; through,through,cutoff;"
                       "cutoff,cutoff,cutoff", None, [None, "", "r32.pth"], None)
    assert g == Graph(
        [Node("resnet32"), Node("resnet110"), Node("resnet32", checkpoint="r32.pth", frozen=True)],
        [[T, K, L], [T, T, C], [C, C, C]], 1.0)
    assert g.nodes[1].checkpoint is None  # "" (an empty CLI slot) means none
    assert Graph.from_cli(["resnet32", "resnet32"], None, None, ["none", "NONE"], None).nodes[0].checkpoint is None


def test_from_cli_presets_and_errors():
    assert Graph.from_cli(["resnet32", "resnet32"], None, None, None, None).gates == [[T, T], [T, T]]  # default dml
    kd = Graph.from_cli(["resnet32", "resnet110"], None, "kd", [None, "t.pth"], None)
    assert kd.temperature == 2.0 and kd.frozen_nodes == (1,)
    assert Graph.from_cli(["resnet32"], "linear", None, None, 3.0).gates == [[L]]
    with pytest.raises(ValueError, match="either gates or a preset, not both"):
        Graph.from_cli(["resnet32"], "through", "dml", None, None)
    with pytest.raises(ValueError, match=r"gates has 1 rows but the graph has 2 nodes"):
        Graph.from_cli(["resnet32", "resnet32"], "through,through", None, None, None)
    with pytest.raises(ValueError, match=r"unknown gate 'trough' at gates\[0\]\[1\]"):
        Graph.from_cli(["resnet32", "resnet32"], "through,trough;through,through", None, None, None)
    with pytest.raises(ValueError, match=r"gates\[1\]: node 1 has an all-cutoff gate row"):
        Graph.from_cli(["resnet32", "resnet32"], "through,through;cutoff,cutoff", None, None, None)
    with pytest.raises(ValueError, match=r"models\[1\]: expected a non-empty model name"):
        Graph.from_cli(["resnet32", " "], None, "dml", None, None)


# ---------------------------------------------------------------- JSON

def test_json_round_trip(tmp_path):
    g = _dcl3()
    d = g.to_dict()
    assert d == {
        "version": 1,
        "temperature": 2.0,
        "nodes": [
            {"model": "resnet32", "model_kwargs": {}, "checkpoint": None, "frozen": False},
            {"model": "resnet110", "model_kwargs": {"drop_rate": 0.1}, "checkpoint": None, "frozen": False},
            {"model": "resnet32", "model_kwargs": {}, "checkpoint": "runs/r32/best.pth", "frozen": True},
        ],
        "gates": [[T, K, L], [T, T, C], [C, C, C]],
    }
    assert Graph.from_dict(d) == g
    d["nodes"][1]["model_kwargs"]["drop_rate"] = 0.5  # to_dict hands out copies
    assert g.nodes[1].model_kwargs == {"drop_rate": 0.1}
    path = g.save(tmp_path / "sub" / "graph.json")
    assert json.loads(path.read_text()) == g.to_dict()
    assert Graph.load(path) == g
    assert Graph.load(str(path)).describe() == g.describe()


def test_from_dict_defaults_and_shorthand():
    g = Graph.from_dict({"nodes": ["resnet32", {"model": "resnet110"}], "gates": [[T, T], [T, T]]})
    assert g.temperature == 1.0 and [n.model for n in g.nodes] == ["resnet32", "resnet110"]


@pytest.mark.parametrize("data,exc,match", [
    ([], TypeError, r"graph: expected a JSON object"),
    ({"nodes": ["resnet32"], "gates": [[T]], "temp": 2}, ValueError, r"temp: unknown key"),
    ({"version": 2, "nodes": ["resnet32"], "gates": [[T]]}, ValueError, r"version: unsupported graph format 2"),
    ({"gates": [[T]]}, ValueError, r"nodes: missing"),
    ({"nodes": ["resnet32"]}, ValueError, r"gates: missing"),
    ({"nodes": {"0": "resnet32"}, "gates": [[T]]}, TypeError, r"nodes: expected a list"),
    ({"nodes": [3], "gates": [[T]]}, TypeError, r"nodes\[0\]: expected an object or a model name"),
    ({"nodes": [{"model": "resnet32", "ckpt": "a"}], "gates": [[T]]}, ValueError, r"nodes\[0\]\.ckpt: unknown key"),
    ({"nodes": [{"model_kwargs": {}}], "gates": [[T]]}, ValueError, r"nodes\[0\]\.model: missing"),
    ({"nodes": [{"model": "resnet32", "model_kwargs": [1]}], "gates": [[T]]}, TypeError,
     r"nodes\[0\]\.model_kwargs: expected an object"),
    ({"nodes": [{"model": "resnet32", "checkpoint": 1}], "gates": [[T]]}, TypeError,
     r"nodes\[0\]\.checkpoint: expected a string or null"),
    ({"nodes": [{"model": "resnet32", "frozen": "no"}], "gates": [[T]]}, TypeError,
     r"nodes\[0\]\.frozen: expected true or false"),
    ({"nodes": ["resnet32"], "gates": "through"}, TypeError, r"gates: expected a list of lists"),
    ({"nodes": ["resnet32"], "gates": [[0]]}, TypeError, r"gates\[0\]\[0\]: expected a gate name, got int"),
    ({"nodes": ["resnet32"], "gates": [[T]], "temperature": None}, TypeError, r"temperature: expected a number"),
])
def test_from_dict_errors(data, exc, match):
    with pytest.raises(exc, match=match):
        Graph.from_dict(data)


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "graph.json"
    d = _dcl3().to_dict()
    d["nodes"][2]["model"] = 110
    bad.write_text(json.dumps(d))
    with pytest.raises(TypeError, match=r"graph\.json: nodes\[2\]\.model: expected a string"):
        Graph.load(bad)
    d = _dcl3().to_dict()
    d["nodes"][2]["checkpoint"] = None
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"graph\.json: nodes\[2\]\.checkpoint: node 2 is frozen"):
        Graph.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"graph\.json: invalid JSON"):
        Graph.load(bad)
    with pytest.raises(FileNotFoundError):
        Graph.load(tmp_path / "missing.json")


# ---------------------------------------------------------------- drawing

def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _five_nodes() -> Graph:
    gates = [[T, L, K, T, C], [T, T, C, K, L], [L, C, K, T, T], [C, C, C, C, C], [K, T, C, L, L]]
    nodes = [Node("resnet32"), Node("wrn28_2"), Node("wrn28_2"), Node("resnet110", checkpoint="r110.pth"),
             Node("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})]
    return Graph(nodes, gates)


@pytest.mark.parametrize("make", [
    lambda: Graph([Node("resnet32")], [[T]]),
    _dcl3,
    _five_nodes,
    lambda: Graph.preset("dml", ["resnet32"] * 8),
])
def test_draw_png_and_svg(tmp_path, make):
    graph = make()
    png = draw_graph(graph, tmp_path / "g.png")
    w, h = _png_size(png)
    assert w > 300 and h > 300
    svg = draw_graph(graph, tmp_path / "nested" / "g.svg", title="my graph")
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and len(text) > 5000


_SVG_PATH = re.compile(r'<path d="([^"]*)"( clip-path="[^"]*")? style="([^"]*)"\s*/>')
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def _drawn(svg: str, m: int) -> tuple[list[str], list[tuple[str, int, int]], list[tuple[str, int]]]:
    """What an SVG drawing shows: each node's fill (by node index, from its place on the ring:
    node 0 at the top, then clockwise), each edge's shaft as (gate, source, target), each
    arrowhead as (gate, node it points into). Sources and targets are the nodes nearest to
    where a shaft starts and ends; a label edge starts at its box beside its node."""
    fills = {_TARGET_FILL, _NODE_FILL, _FROZEN_FILL}
    gate_of = {color: gate for gate, (color, _) in GATE_STYLES.items()}
    circles, shafts, heads = [], [], []
    for d, clipped, style in _SVG_PATH.findall(svg):
        if not clipped:
            continue  # the legend is drawn outside the axes
        nums = [float(v) for v in _NUMBER.findall(d)]
        points = list(zip(nums[0::2], nums[1::2]))
        props = dict(item.split(": ", 1) for item in style.split("; "))
        if props.get("fill") in fills:
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            circles.append(((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, props["fill"]))
        elif props.get("fill") == "none" and props.get("stroke") in gate_of:
            shafts.append((gate_of[props["stroke"]], points[0], points[-1]))
        elif set(props) == {"fill"} and props["fill"] in gate_of:
            heads.append((gate_of[props["fill"]], points[1]))  # a triangle: base, tip, base
    assert len(circles) == m
    cx, cy = sum(c[0] for c in circles) / m, sum(c[1] for c in circles) / m
    index = {}
    for x, y, fill in circles:  # SVG's y points down
        angle = math.atan2(-(y - cy), x - cx) if m > 1 else math.pi / 2
        index[(x, y)] = round((math.pi / 2 - angle) / (2 * math.pi / m)) % m
    assert sorted(index.values()) == list(range(m))
    node_fills = [fill for _, _, fill in sorted(circles, key=lambda c: index[(c[0], c[1])])]

    def nearest(point):
        return index[min(((x, y) for x, y, _ in circles), key=lambda c: math.dist(c, point))]

    edges = sorted((gate, nearest(a), nearest(b)) for gate, a, b in shafts)
    return node_fills, edges, sorted((gate, nearest(tip)) for gate, tip in heads)


@pytest.mark.parametrize("make", [
    lambda: Graph([Node("resnet32")], [[T]]),
    _dcl3,
    _five_nodes,
    lambda: Graph.preset("dml", ["resnet32"] * 8),
    lambda: Graph([Node("resnet32"), Node("resnet32")], [[T, L], [C, K]]),
])
def test_drawing_shows_each_edge_with_its_gate_and_direction(tmp_path, make):
    graph = make()
    m = graph.num_nodes
    fills, edges, heads = _drawn(draw_graph(graph, tmp_path / "g.svg").read_text(), m)
    assert fills == [_TARGET_FILL] + [_FROZEN_FILL if n.frozen else _NODE_FILL for n in graph.nodes[1:]]
    # every non-cutoff edge s → t once, in its gate's style, pointing into t; nothing for cutoff
    expected = sorted((graph.gates[t][s], s, t) for t in range(m) for s in range(m) if graph.gates[t][s] != C)
    assert edges == expected
    assert heads == sorted((gate, t) for gate, _, t in expected)


def test_draw_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        draw_graph(_dcl3(), tmp_path / "g.jpg")
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        draw_graph(_dcl3(), tmp_path / "g")
    with pytest.raises(TypeError, match="expected a Graph"):
        draw_graph(_dcl3().to_dict(), tmp_path / "g.png")
