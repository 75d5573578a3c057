"""``--recipe paper``: the authors' released code where the project's defaults differ (SPEC §8),
each difference observed from outside the trainer on real CIFAR-10 images.

One module-scoped run: 2 small CIFAR ResNets with linear gates, 140 training images at batch
64 (2 full batches: the last partial one is dropped), 5 epochs, so the lr decays when the
1-based epoch reaches 2, 3 and 4 (round(30/60/90 % of 5), as 60/120/180 of 200).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import train_dcl
from timm_dcl.checkpoint import save_node_weights
from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph, Node
from timm_dcl.models.cifar_resnet import CifarBasicBlock
from timm_dcl.nodes import create_node_model
from timm_dcl.trainer import GraphTrainer

T, C, L = "through", "cutoff", "linear"
SMALL = {"depth": 8}  # a resnet20 cut to one block per stage: the recipe, not the network, is under test
TRAIN_IMAGES, BATCH, EPOCHS = 140, 64, 5
DATA = dict(dataset="cifar10", eval_subset=20, workers=0, progress_bar=False, seed=0)


@dataclass
class Watch:
    progress: list[float] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # augmented uint8, as the loader gives them
    inputs: list[torch.Tensor] = field(default_factory=list)  # what node 0's forward received (training)
    first_weights: dict = field(default_factory=dict)


def _watch(trainer: GraphTrainer) -> Watch:
    w = Watch()
    loss_fn, augment = trainer.loss_fn, trainer.train_loader.augment

    def loss(logits, labels, progress):
        w.progress.append(float(progress))
        return loss_fn(logits, labels, progress=progress)

    def augmented(images, generator=None):
        out = augment(images, generator)
        w.images.append(out.clone())
        return out

    def seen(module, args):
        if module.training:
            w.inputs.append(args[0].detach().clone())
        if not w.first_weights:
            w.first_weights.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    trainer.loss_fn, trainer.train_loader.augment = loss, augmented
    trainer.nodes[0].raw.register_forward_pre_hook(seen)
    return w


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, cifar10):
    out = tmp_path_factory.mktemp("paper")
    cfg = TrainConfig(data_dir=cifar10, **DATA, recipe="paper", train_subset=TRAIN_IMAGES, epochs=EPOCHS,
                      output=str(out))
    trainer = GraphTrainer(Graph([Node("resnet20", model_kwargs=SMALL), Node("resnet20", model_kwargs=SMALL)],
                                 [[T, L], [L, T]]), cfg)
    watch = _watch(trainer)
    trainer.fit()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, watch, metrics, out


def test_lr_decays_when_the_one_based_epoch_reaches_the_milestones(paper_run):
    _, _, metrics, _ = paper_run
    # 1-based epoch 1 at 0.1, 2 at 0.01, 3 at 1e-3, 4-5 at 1e-4 (the authors: ≥ 60, 120, 180 of 200).
    expected = [0.1, 0.01, 1e-3, 1e-4, 1e-4]
    assert [r["epoch"] for r in metrics] == list(range(1, EPOCHS + 1))
    for r, lr in zip(metrics, expected):
        assert r["lr"] == pytest.approx([lr, lr], rel=1e-9), (r["epoch"], r["lr"])


def test_milestones_scale_with_epochs_and_default_differs_by_one_epoch():
    paper = TrainConfig(recipe="paper")
    assert paper.decay_milestones_for(200) == [59, 119, 179]  # 0-based: 1-based 60, 120, 180 decayed
    assert TrainConfig().decay_milestones_for(200) == [60, 120, 180]
    assert TrainConfig(recipe="paper").decay_milestones_for(10) == [2, 5, 8]  # 1-based 3, 6, 9 decayed
    assert TrainConfig(recipe="paper", decay_milestones=[7]).decay_milestones_for(200) == [7]  # a flag wins


def test_nodes_get_pixels_in_zero_one_without_normalisation(paper_run):
    _, watch, _, _ = paper_run
    assert len(watch.inputs) == len(watch.images) == 2 * EPOCHS
    for images, x in zip(watch.images, watch.inputs):
        torch.testing.assert_close(x, images.float() / 255.0, rtol=0, atol=1e-6)
    assert 0.0 <= min(float(x.min()) for x in watch.inputs) and max(float(x.max()) for x in watch.inputs) <= 1.0


def test_last_partial_batch_is_dropped(paper_run):
    trainer, watch, _, _ = paper_run
    assert len(trainer.train_loader) == TRAIN_IMAGES // BATCH == 2
    assert all(images.shape[0] == BATCH for images in watch.images)
    assert trainer.iteration == 2 * EPOCHS


def test_linear_gate_weight_is_k_over_the_authors_K(paper_run):
    _, watch, _, _ = paper_run
    big_k = (TRAIN_IMAGES // BATCH + 1) * EPOCHS  # K = (⌊N/B⌋ + 1)·epochs = 15
    assert watch.progress == pytest.approx([k / big_k for k in range(1, 2 * EPOCHS + 1)], rel=1e-12)
    assert watch.progress[-1] < 1.0  # ends just below 1, as the authors' code did


def test_plain_he_init_no_zero_last_bn(paper_run):
    trainer, watch, _, _ = paper_run
    blocks = [name for name, m in trainer.nodes[0].raw.named_modules() if isinstance(m, CifarBasicBlock)]
    assert blocks
    for name in blocks:  # every block's last BN starts at weight 1 (the default recipe zeroes it)
        assert torch.equal(watch.first_weights[f"{name}.bn2.weight"],
                           torch.ones_like(watch.first_weights[f"{name}.bn2.weight"]))
    spec = Node("resnet20")
    default = create_node_model(spec, 0, num_classes=10, input_size=(3, 32, 32), log=lambda *_: None)
    assert all(float(m.bn2.weight.detach().abs().max()) == 0 for m in default.modules() if isinstance(m, CifarBasicBlock))


def test_recipe_is_saved(paper_run):
    _, _, _, out = paper_run
    assert json.loads((out / "config.json").read_text())["recipe"] == "paper"


def _teacher(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_node_model(Node("resnet20"), 1, num_classes=10, input_size=(3, 32, 32), log=lambda *_: None)
    path = tmp_path / "teacher.pth"
    save_node_weights(path, model, model_name="resnet20", model_kwargs={}, num_classes=10, dataset="cifar10")
    return path


@pytest.mark.parametrize("frozen_bn", ["train", "eval"])
def test_frozen_bn_mode_on_a_frozen_node(tmp_path, cifar10, frozen_bn):
    teacher = _teacher(tmp_path)
    cfg = TrainConfig(data_dir=cifar10, **DATA, recipe="paper", frozen_bn=frozen_bn, train_subset=BATCH,
                      epochs=1, output=None)
    trainer = GraphTrainer(Graph([Node("resnet20"), Node("resnet20", checkpoint=str(teacher))], [[T, T], [C, C]]),
                           cfg)
    frozen = trainer.nodes[1].raw
    modes: list[bool] = []
    frozen.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    trainer._train_epoch(0)
    after = frozen.state_dict()
    assert modes == [frozen_bn == "train"]
    drifted = [k for k in before if "running_mean" in k and not torch.equal(before[k], after[k])]
    weights_changed = [k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])]
    assert not weights_changed  # never updated, in either mode
    assert bool(drifted) == (frozen_bn == "train")  # batch statistics only in train mode


def test_cli_flags_override_the_recipe(tmp_path, cifar10):
    out = tmp_path / "run"
    rc = train_dcl.main(["--node-models", "resnet20", "--preset", "independent", "--dataset", "cifar10",
                         "--data-dir", cifar10, "--train-subset", "70", "--eval-subset", "20", "--epochs", "1",
                         "--workers", "0", "--no-progress", "--recipe", "paper", "--batch-size", "32",
                         "--decay-milestones", "5", "--no-drop-last", "--output", str(out)])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["recipe"], cfg["batch_size"], cfg["decay_milestones"], cfg["drop_last"]) == ("paper", 32, [5], False)
    assert "recipe: paper" in (out / "config.yaml").read_text()
    assert not TrainConfig(**{k: v for k, v in cfg.items() if k != "extra"}).drops_last_batch


def test_bad_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="--recipe must be one of timm-dcl, paper"):
        TrainConfig(recipe="authors")
    with pytest.raises(ValueError, match="--frozen-bn must be eval or train"):
        TrainConfig(frozen_bn="drift")


def test_frozen_bn_train_drift_survives_a_resume(tmp_path, cifar10):
    """With --frozen-bn train the frozen node's statistics are state: the checkpoint keeps them
    and a resume continues from them (in eval mode they never change, so nothing is saved)."""
    teacher = _teacher(tmp_path)
    out = tmp_path / "run"
    graph = Graph([Node("resnet20", model_kwargs=SMALL), Node("resnet20", checkpoint=str(teacher))], [[T, T], [C, C]])
    kw = dict(data_dir=cifar10, **DATA, recipe="paper", frozen_bn="train", train_subset=BATCH)
    first = GraphTrainer(graph, TrainConfig(**kw, epochs=1, output=str(out)))
    first.fit()
    drifted = {k: v.clone() for k, v in first.nodes[1].raw.state_dict().items()}
    saved = torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=False)["models"][1]
    assert saved is not None and all(torch.equal(saved[k], drifted[k]) for k in drifted)
    resumed = GraphTrainer(graph, TrainConfig(**kw, epochs=2, resume=str(out)))
    now = resumed.nodes[1].raw.state_dict()
    assert all(torch.equal(now[k], drifted[k]) for k in drifted)
    before = TrainConfig(**kw, epochs=1, output=None)
    assert not torch.equal(GraphTrainer(graph, before).nodes[1].raw.state_dict()["bn1.running_mean"],
                           drifted["bn1.running_mean"])  # a fresh load is the teacher file, not the drift
