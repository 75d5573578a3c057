"""Trained nodes as ordinary timm models (issue 16, part 2): the run's timm/ folders load with
timm alone and give the logits the run evaluated with; --push-to-hub fails offline in one line
after the run's files are safe, and its flags are checked before the run trains."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_dcl
from timm_dcl.graph import Graph
from timm_dcl.hub import check_push_args, load_node_folder, node_model_card

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
# test_resnet: a timm network (timm alone builds it), mean/std 0.5; resnet20: ours, CIFAR mean/std
MODELS = "test_resnet,resnet20"

_LOAD_WITH_TIMM_ALONE = r"""
import json, sys
import timm, torch
from timm.data import resolve_data_config
folder, data = sys.argv[1], torch.load(sys.argv[2])
config = json.load(open(folder + "/config.json"))
by_dir = timm.create_model("local-dir:" + folder, pretrained=True).eval()
# the overlay names the file's class count too: without it timm takes the name's default cfg
# (1000 classes), sees a head that does not fit and re-initialises it
k = config["num_classes"]
by_name = timm.create_model(config["architecture"], pretrained=True, num_classes=k,
                            pretrained_cfg_overlay=dict(file=folder + "/model.safetensors", num_classes=k)).eval()
dc = resolve_data_config({}, model=by_dir)  # the run's mean/std, from config.json
mean, std = (torch.tensor(dc[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
x = (data["images"].float() / 255 - mean) / std
with torch.no_grad():
    out = {"by_dir": by_dir(x), "by_name": by_name(x), "timm_dcl_imported": "timm_dcl" in sys.modules,
           "input_size": list(dc["input_size"])}
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar10):
    """A short real run with --push-to-hub while offline, and the logits it evaluated with."""
    out = tmp_path_factory.mktemp("hub") / "run"
    env_before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = train_dcl.main(["--node-models", MODELS, "--dataset", "cifar10", "--data-dir", cifar10,
                               "--train-subset", "64", "--eval-subset", "40", "--epochs", "1", "--batch-size", "16",
                               "--workers", "0", "--output", str(out), "--push-to-hub", "someone/ktg-node",
                                   "--push-nodes", "0,1"])
    finally:
        if env_before is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = env_before
    return out, code, [line for line in err.getvalue().splitlines() if line.startswith("train_dcl.py")]


def _eval_images(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's evaluation images (uint8) and labels, from its own config."""
    from timm_dcl.config import TrainConfig
    from timm_dcl.trainer import build_run_data

    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    data = build_run_data(cfg, MODELS.split(",")[0])
    images, labels = zip(*data.eval_loader("eval", batch_size=64))
    return torch.cat(images), torch.cat(labels)


def test_push_offline_is_one_line_after_the_run_is_safe(run):
    out, code, err = run
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("train_dcl.py: error: --push-to-hub someone/ktg-node: cannot push (")
    assert f"the run is complete and its files are in {out}" in err[0]
    for name in ("summary.json", "checkpoints/last.pth", "nodes/node0_test_resnet.pth",
                 "timm/node0_test_resnet/config.json", "timm/node0_test_resnet/model.safetensors",
                 "timm/node1_resnet20/model.safetensors"):
        assert (out / name).is_file(), name


def test_node_folder_loads_with_timm_alone_and_gives_the_runs_logits(run, cifar10, tmp_path):
    out = run[0]
    images, labels = _eval_images(out)
    summary = json.loads((out / "summary.json").read_text())
    folder = out / "timm" / "node0_test_resnet"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["timm_dcl"]["top1"] == summary["final_top1"][0] and config["timm_dcl"]["dataset"] == "cifar10"
    assert config["timm_dcl"]["graph"]["nodes"][1]["model"] == "resnet20"
    torch.save({"images": images}, tmp_path / "data.pth")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITH_TIMM_ALONE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")  # no timm_dcl on the path
    proc = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "data.pth"),
                           str(tmp_path / "out.pth")], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pth", weights_only=False)
    assert not got["timm_dcl_imported"] and got["input_size"] == [3, 32, 32]
    # the logits the run evaluated with: its task's evaluation forward, with the weights it saved
    from timm_dcl import KTGTask

    nets = [load_node_folder(out / "timm" / f) for f in ("node0_test_resnet", "node1_resnet20")]
    task = KTGTask(nets, preset="dml", verbose=False).eval()
    run_logits = task.node_logits(images)
    torch.testing.assert_close(got["by_dir"], run_logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["by_name"], got["by_dir"])
    top1 = (run_logits[0].argmax(1) == labels).double().mean().item() * 100
    assert top1 == pytest.approx(summary["final_top1"][0])
    # node 1, a CIFAR network: the same folder, loaded once timm_dcl has registered it
    assert (run_logits[1].argmax(1) == labels).double().mean().item() * 100 == pytest.approx(summary["final_top1"][1])
    weights = torch.load(out / "nodes" / "node1_resnet20.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], v) for k, v in nets[1].state_dict().items())


def test_push_flags_are_checked_before_training():
    graph = Graph.preset("dml", ["resnet20", "resnet20", "ensemble"])
    assert check_push_args(None, None, graph) == [] and check_push_args("org/name", None, graph) == [0]
    assert check_push_args("org/name", "1,0", graph) == [1, 0]
    for repo, nodes, match in [(None, "0", "needs --push-to-hub"), ("a/b/c", None, "no Hugging Face repository id"),
                               ("org/name", "x", "expected node indices"), ("org/name", "5", "out of range"),
                               ("org/name", "2", "an ensemble"), ("org/name", "0,0", "listed twice")]:
        with pytest.raises(ValueError, match=match):
            check_push_args(repo, nodes, graph)


def test_bad_push_flag_is_one_line_and_trains_nothing(tmp_path, capsys):
    code = train_dcl.main(["--node-models", "resnet20,resnet20", "--push-nodes", "1", "--output", str(tmp_path / "r")])
    assert code == 2
    assert capsys.readouterr().err.strip() == "train_dcl.py: error: --push-nodes needs --push-to-hub ORG/NAME"
    assert not (tmp_path / "r").exists()


def test_model_card_names_the_graph_data_and_top1():
    graph = Graph.preset("dml", ["resnet20", "wrn16_2"]).to_dict()
    card = node_model_card({"node": 0, "graph": graph, "dataset": "cifar10", "top1": 71.25, "split": "eval",
                            "epochs": 200}, "org/name")
    assert "Knowledge Transfer Graph" in card["description"] and "| 1 | wrn16_2 | through, through |" in \
        card["description"]
    assert card["details"]["Dataset"] == "cifar10" and card["details"]["Top-1"].startswith("71.25 %")
    assert json.loads(card["details"]["Graph"]) == graph and "hf-hub:org/name" in card["usage"]
