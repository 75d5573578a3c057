"""train_dcl.py's command line: model kwargs, per-node flags, YAML configs and one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_dcl
from timm_dcl.cli import CliError, parse_model_kwargs, split_top_level

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_model_kwargs_take_python_literals():
    got = parse_model_kwargs(["1:img_size=(32,32),patch_size=4,drop_rate=0.1", "all:pretrained_strict=False",
                              "0:widths=[16, 32],act_layer=relu,name='a,b'"], 2)
    assert got[1] == {"img_size": (32, 32), "patch_size": 4, "drop_rate": 0.1, "pretrained_strict": False}
    assert got[0] == {"pretrained_strict": False, "widths": [16, 32], "act_layer": "relu", "name": "a,b"}
    assert split_top_level("a=(1,2),b={'x': [1,2]},c") == ["a=(1,2)", "b={'x': [1,2]}", "c"]


@pytest.mark.parametrize("items, match", [
    (["img_size=32"], "expected N:KEY=VALUE"),
    (["x:depth=2"], "'x' is not a node index"),
    (["5:depth=2"], "node 5 does not exist"),
    (["0:=3"], "is not KEY=VALUE"),
])
def test_model_kwargs_errors(items, match):
    with pytest.raises(CliError, match=match):
        parse_model_kwargs(items, 2)


def _args(*argv: str):
    args, _ = train_dcl.parse_args(list(argv))
    return args


def test_per_node_flags_land_in_the_graph(tmp_path):
    from timm_dcl.cli import graph_from_args

    weights = tmp_path / "t.pth"
    weights.write_bytes(b"x")
    args = _args("--node-models", "resnet20,resnet32,resnet20", "--gates",
                 "through,through,through;through,through,cutoff;cutoff,cutoff,cutoff",
                 "--pretrained", "1", "--pretrained-file", f"2:{weights}", "--node-lr", "0:0.05,1:0.01",
                 "--node-opt", "1:adamw", "--node-weight-decay", "1:0.05", "--model-kwargs", "all:drop_rate=0.1")
    graph = graph_from_args(args)
    n0, n1, n2 = graph.nodes
    assert (n0.lr, n0.opt, n0.pretrained) == (0.05, None, False)
    assert (n1.lr, n1.opt, n1.weight_decay, n1.pretrained) == (0.01, "adamw", 0.05, True)
    assert n2.pretrained_file == str(weights) and n2.frozen  # weights + an all-cutoff row: a frozen teacher
    assert all(n.model_kwargs == {"drop_rate": 0.1} for n in graph.nodes)
    # the graph JSON carries them and reads them back
    from timm_dcl.graph import Graph
    again = Graph.from_dict(graph.to_dict())
    assert again.to_dict() == graph.to_dict() and again.nodes[1].opt == "adamw"
    # old files without the new keys still load, and the keys are only written when set
    assert "lr" not in Graph.from_dict({"nodes": ["resnet20"], "gates": [["through"]]}).to_dict()["nodes"][0]


def test_kd_preset_with_a_pretrained_file_teacher(tmp_path):
    from timm_dcl.cli import graph_from_args

    weights = tmp_path / "t.safetensors"
    weights.write_bytes(b"x")
    graph = graph_from_args(_args("--node-models", "resnet20,resnet32", "--preset", "kd",
                                  "--pretrained-file", f"1:{weights}"))
    assert graph.nodes[1].frozen and graph.temperature == 2.0


def test_yaml_config_gives_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("node_models: resnet20,resnet32\ndataset: cifar10\nlr: 1e-3\nopt: adamw\nepochs: 7\n"
                   "model_kwargs: '1:drop_rate=0.1'\ndecay_milestones: [2, 4]\nin_memory: false\n")
    args = _args("--config", str(cfg), "--epochs", "3")
    assert args.node_models == "resnet20,resnet32" and args.opt == "adamw"
    assert args.lr == 1e-3 and isinstance(args.lr, float)  # YAML reads 1e-3 as a string: converted like a flag
    assert args.epochs == 3  # the command line wins
    assert args.model_kwargs == ["1:drop_rate=0.1"] and args.decay_milestones == [2, 4] and args.in_memory is False


@pytest.mark.parametrize("text, match", [
    ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("lr: fast\n", "lr"),
    ("sched: sometimes\n", "sched: 'sometimes' is not one of"),
    ("- a\n- b\n", "expected a mapping"),
    ("lr: [\n", "not valid YAML"),
])
def test_bad_yaml_config_is_one_line(tmp_path, capsys, text, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert train_dcl.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_dcl.py: error: --config") and match in err and err.count("\n") == 1


def test_missing_config_file(capsys):
    assert train_dcl.main(["--config", "/nonexistent/run.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def _cli(*argv: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train_dcl.py"), *argv], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=300)


@pytest.mark.parametrize("argv, match", [
    (["--node-models", "resnet20", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--node-models", "resnet20", "--dataset", "folder"], "--dataset folder needs --data-dir"),
    (["--node-models", "resnet20", "--dataset", "hfds/someone/not-here"], "someone/not-here"),
    (["--node-models", "resnet20", "--dataset", "mnist"], "--dataset must be one of"),
    (["--node-models", "resnet20", "--pretrained-file", "0:/nonexistent.safetensors"], "no file at"),
    (["--node-models", "resnet20", "--opt", "sgdd"], "--opt sgdd"),
    (["--node-models", "resnet20,vit_tiny_patch16_224", "--model-kwargs", "1:img_size=224", "--dataset", "cifar10",
      "--data-dir", "/nonexistent"], "cannot run at input size (3, 32, 32)"),
    (["--node-models", "resnet20", "--pretrained", "--dataset", "cifar10", "--data-dir", "SHARED/cifar10",
      "--train-subset", "20", "--eval-subset", "10", "--workers", "0"], "--pretrained-file 0:PATH"),
])
def test_cli_errors_are_one_line_without_traceback(tmp_path, shared_data, argv, match):
    argv = [a.replace("SHARED", str(shared_data)) for a in argv]
    result = _cli(*argv, "--epochs", "1", "--output", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train_dcl.py: error:")]
    assert len(lines) == 1 and match in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_the_readme_example_config_is_valid():
    args = _args("--config", str(REPO_ROOT / "examples" / "byod.yaml"))
    assert args.node_models == "resnet20,resnet32" and args.dataset == "folder" and args.img_size == 64
    assert args.pretrained_file == ["1:output/teacher/nodes/node0_resnet32.pth"] and args.node_lr == ["1:0.01"]
    assert (args.sched, args.warmup_epochs, args.warmup_lr) == ("cosine", 1, 0.01)
