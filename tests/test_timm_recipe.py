"""timm's training recipe on a graph: mixup/CutMix/label smoothing into the fused op's soft
targets, RandAugment and random erasing, gradient accumulation, and the flags' errors and
config.yaml round trip."""
from __future__ import annotations

import pytest
import torch
import yaml

import train_dcl
from conftest import read_metrics
from timm_dcl.accumulation import Accumulation
from timm_dcl.config import TrainConfig
from timm_dcl.mixing import BatchMixing, build_batch_mixing

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--eval-subset", "60", "--no-progress", "--workers", "0", "--seed", "3"]
RECIPE_FLAGS = ["--mixup", "0.8", "--cutmix", "1.0", "--cutmix-minmax", "0.3", "0.9", "--mixup-prob", "0.9",
                "--mixup-switch-prob", "0.4", "--mixup-mode", "pair", "--mixup-off-epoch", "5", "--smoothing", "0.1",
                "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--remode", "const", "--recount", "2",
                "--color-jitter", "0.3", "--train-interpolation", "bicubic", "--grad-accum-steps", "3"]
PIXEL_NORM = (torch.full((1, 3, 1, 1), 120.0), torch.full((1, 3, 1, 1), 60.0))


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("argv, match", [
    (["--mixup", "-0.1"], "--mixup must be a number ≥ 0"),
    (["--cutmix", "-1"], "--cutmix must be a number ≥ 0"),
    (["--cutmix-minmax", "0.9", "0.3"], "--cutmix-minmax must be MIN MAX with 0 < MIN < MAX ≤ 1"),
    (["--mixup-prob", "1.5"], "--mixup-prob must lie in [0, 1]"),
    (["--mixup-switch-prob", "-0.5"], "--mixup-switch-prob must be a number ≥ 0"),
    (["--mixup-mode", "rows"], "argument --mixup-mode: invalid choice"),
    (["--mixup-off-epoch", "-1"], "--mixup-off-epoch must be an epoch ≥ 0"),
    (["--smoothing", "1"], "--smoothing must be below 1"),
    (["--smoothing", "2"], "--smoothing must lie in [0, 1]"),
    (["--mixup", "0.2", "--batch-size", "33"], "--batch-size must be even"),
    (["--aa", "rand-x9"], "--aa 'rand-x9': not a policy timm knows"),
    (["--aa", "rand-m9", "--in-memory", "yes"], "--in-memory yes: --aa rand-m9 is a per-image transform"),
    (["--reprob", "1.2"], "--reprob must lie in [0, 1]"),
    (["--remode", "noise"], "argument --remode: invalid choice"),
    (["--recount", "0"], "--recount must be an integer ≥ 1"),
    (["--color-jitter", "-0.4"], "--color-jitter must be ≥ 0"),
    (["--train-interpolation", "cubic"], "argument --train-interpolation: invalid choice"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be an integer ≥ 1"),
    (["--grad-accum-steps", "two"], "argument --grad-accum-steps: invalid int value"),
])
def test_bad_recipe_flags_are_one_line(tmp_path, capsys, argv, match):
    code = train_dcl.main(["--node-models", "resnet20", "--dataset", "cifar10", "--output", str(tmp_path / "r"),
                           *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("train_dcl.py: error: ") and err.count("\n") == 1 and match in err, err
    assert "Traceback" not in err


def test_recipe_flags_round_trip_through_config_yaml(tmp_path):
    args, parser = train_dcl.parse_args(["--node-models", "resnet20", "--batch-size", "32", *RECIPE_FLAGS])
    from timm_dcl.cli import config_to_yaml
    text = config_to_yaml(args, parser)
    saved = yaml.safe_load(text)
    assert saved["mixup"] == 0.8 and saved["cutmix_minmax"] == [0.3, 0.9] and saved["aa"] == "rand-m9-mstd0.5-inc1"
    path = tmp_path / "config.yaml"
    path.write_text(text)
    again, _ = train_dcl.parse_args(["--config", str(path)])
    names = ("mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob", "mixup_mode", "mixup_off_epoch",
             "smoothing", "aa", "reprob", "remode", "recount", "color_jitter", "train_interpolation",
             "grad_accum_steps")
    for name in names:
        assert getattr(again, name) == getattr(args, name), name
    cfg = TrainConfig.from_args(again)
    assert cfg.grad_accum_steps == 3 and cfg.mixup_mode == "pair" and cfg.cutmix_minmax == [0.3, 0.9]


def test_defaults_and_paper_recipe_leave_the_batch_alone():
    for cfg in (TrainConfig(), TrainConfig(recipe="paper")):
        assert build_batch_mixing(cfg, 10, *PIXEL_NORM) is None
        assert cfg.grad_accum_steps == 1 and cfg.aa is None and cfg.in_memory is None


# ----------------------------------------------------------------------------- the batch transform

def _batch(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8), torch.arange(n) % 10


def test_mixup_cutmix_smoothing_give_soft_targets():
    torch.manual_seed(0)
    cfg = TrainConfig(mixup=0.8, cutmix=1.0, smoothing=0.1, batch_size=8)
    mixing = build_batch_mixing(cfg, 10, *PIXEL_NORM)
    images, labels = _batch()
    seen_mixed = False
    for _ in range(6):
        x, y = mixing(images, labels, epoch=0)
        assert x.dtype == torch.float32 and x.shape == images.shape and y.shape == (8, 10)
        torch.testing.assert_close(y.sum(1), torch.ones(8))
        assert float(y.min()) >= 0.1 / 10 - 1e-7  # smoothing leaves every class its share
        seen_mixed |= not torch.equal(x, images.float())
    assert seen_mixed
    assert images.dtype == torch.uint8 and torch.equal(images, _batch()[0])  # the loader's batch is untouched


def test_mixup_off_epoch_and_smoothing_alone():
    cfg = TrainConfig(mixup=1.0, mixup_off_epoch=2, smoothing=0.2, batch_size=8)
    mixing = build_batch_mixing(cfg, 10, *PIXEL_NORM)
    images, labels = _batch()
    x, y = mixing(images, labels, epoch=2)  # off from epoch 2: images as they were, smoothed labels
    assert torch.equal(x, images.float())
    want = torch.full((8, 10), 0.02)
    want[torch.arange(8), labels] = 0.82
    torch.testing.assert_close(y, want)
    assert mixing.record(1) == {"mixup": True, "smoothing": 0.2, "reprob": 0.0}
    assert mixing.record(2)["mixup"] is False
    only = build_batch_mixing(TrainConfig(smoothing=0.2), 10, *PIXEL_NORM)
    x, y = only(images, labels, epoch=0)
    assert x is images
    torch.testing.assert_close(y, want)


def test_odd_last_batch_keeps_its_odd_sample():
    torch.manual_seed(1)
    mixing = build_batch_mixing(TrainConfig(mixup=1.0, smoothing=0.1, batch_size=8), 10, *PIXEL_NORM)
    images, labels = _batch(7)
    x, y = mixing(images, labels, epoch=0)
    assert x.shape == images.shape and y.shape == (7, 10)
    assert torch.equal(x[-1], images[-1].float())
    assert abs(float(y[-1, labels[-1]]) - 0.91) < 1e-6


def test_random_erasing_on_the_batch():
    torch.manual_seed(2)
    mixing = build_batch_mixing(TrainConfig(reprob=1.0, remode="const"), 10, *PIXEL_NORM)
    images, labels = _batch()
    x, y = mixing(images, labels, epoch=0)
    assert y is labels  # no smoothing, no mixing: the integer labels
    changed = (x != images.float()).flatten(1).any(1)
    assert changed.all()
    # const mode fills with 0 in the normalised space: the mean pixel here
    assert bool((x == 120.0).flatten(1).any(1).all())


# ----------------------------------------------------------------------------- accumulation

def test_accumulation_groups():
    acc = Accumulation(2, 5)
    assert acc.updates_per_epoch == 3
    assert [acc.starts_update(s) for s in range(5)] == [True, False, True, False, True]
    assert [acc.ends_update(s) for s in range(5)] == [False, True, False, True, True]
    assert [acc.loss_scale(s) for s in range(5)] == [0.5, 0.5, 0.5, 0.5, 1.0]


def _schedule_of(cifar10, tmp_path, name, batch, steps):
    """Every optimiser update's lr and the linear gate's progress of a short real run."""
    from timm_dcl.graph import Graph
    from timm_dcl.trainer import GraphTrainer

    graph = Graph.from_cli(["resnet20", "resnet20"], gates="through,linear;linear,through")
    cfg = TrainConfig(dataset="cifar10", data_dir=cifar10, train_subset=64, eval_subset=20, epochs=2,
                      batch_size=batch, grad_accum_steps=steps, sched="cosine", sched_on_updates=True,
                      warmup_epochs=1, lr=0.05, workers=0, progress_bar=False, output=str(tmp_path / name),
                      edge_stats_every=0, in_memory=True)
    trainer = GraphTrainer(graph, cfg)
    updates, progresses = [], []
    step, loss_fn = trainer.optimizer.step, trainer.loss_fn.forward

    def spy_step(*a, **k):
        updates.append((trainer.iteration, trainer.node_lrs()))
        return step(*a, **k)

    def spy_loss(logits, labels, progress=1.0):
        progresses.append(float(progress))
        return loss_fn(logits, labels, progress=progress)

    trainer.optimizer.step, trainer.loss_fn.forward = spy_step, spy_loss
    trainer.fit()
    return trainer, updates, progresses


def test_accumulating_2x32_follows_the_schedule_of_one_batch_of_64(cifar10, tmp_path):
    # 2 × 16 against 32 on 64 images (two updates an epoch): the same schedule as 2 × 32 and 64, faster
    one, updates_64, progress_64 = _schedule_of(cifar10, tmp_path, "b32", 32, 1)
    two, updates_32, progress_32 = _schedule_of(cifar10, tmp_path, "b16x2", 16, 2)
    assert len(updates_64) == 4 and [k for k, _ in updates_64] == [1, 2, 3, 4]
    assert updates_32 == updates_64  # the same update count k and every node's lr at each update
    assert one.total_iterations == two.total_iterations == 4
    assert progress_32 == [p for p in progress_64 for _ in range(2)]  # both batches of an update: its k/K
    assert progress_64 == [0.25, 0.5, 0.75, 1.0]
    assert [r["lr"] for r in read_metrics(two.output)] == [r["lr"] for r in read_metrics(one.output)]


# ----------------------------------------------------------------------------- real runs

def test_mixup_cutmix_smoothing_run_on_cifar10(cifar10, tmp_path):
    out = tmp_path / "mix"
    code = train_dcl.main(["--node-models", "resnet20,resnet20", "--gates", "through,correct;through,through",
                           "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "2", "--train-subset", "64",
                           "--batch-size", "32", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1",
                           "--mixup-off-epoch", "1", *TINY, "--output", str(out)])
    assert code == 0
    records = read_metrics(out)
    assert [r["mixup"] for r in records] == [True, False] and all(r["smoothing"] == 0.1 for r in records)
    assert all(v == v and v > 0 for r in records for v in r["train_loss"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["mixup"] == 0.8 and saved["cutmix"] == 1.0 and saved["smoothing"] == 0.1


def test_a_mixed_batch_reaches_the_nodes_as_pixels(cifar10, tmp_path):
    """Mixup on, but drawn for no batch (--mixup-prob 0): the batch leaves the mixing as float
    pixels with one-hot targets, and the run must equal the plain run. Before the fix the float
    pixels were taken as already normalised, and every mixed run ended at chance."""
    common = ["--node-models", "resnet20,resnet20", "--dataset", "cifar10", "--data-dir", cifar10, "--epochs", "1",
              "--train-subset", "64", "--batch-size", "32", *TINY]
    assert train_dcl.main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert train_dcl.main([*common, "--mixup", "1.0", "--mixup-prob", "0.0", "--output", str(tmp_path / "mix")]) == 0
    plain, mixed = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "mix")
    assert mixed[0]["mixup"] is True
    assert mixed[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=1e-5)
    assert mixed[0]["top1"] == plain[0]["top1"]


def test_randaugment_and_erasing_in_the_streaming_path(cifar10, capsys):
    from timm.data.auto_augment import RandAugment

    from timm_dcl.trainer import build_run_data

    cfg = TrainConfig(dataset="cifar10", data_dir=cifar10, train_subset=40, eval_subset=20, workers=0,
                      aa="rand-m9-mstd0.5-inc1", reprob=1.0, batch_size=8)
    data = build_run_data(cfg, "resnet20")
    assert not data.in_memory
    steps = data.train.train_transform.transforms
    assert any(isinstance(t, RandAugment) for t in steps)
    loader = data.train_loader(8, seed=0)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    # the same epoch without the policy: RandAugment changed the pixels
    plain = build_run_data(TrainConfig(dataset="cifar10", data_dir=cifar10, train_subset=40, eval_subset=20,
                                       workers=0, in_memory=False), "resnet20")
    plain_images, plain_labels = next(iter(plain.train_loader(8, seed=0)))
    assert torch.equal(labels, plain_labels) and not torch.equal(images, plain_images)
    mixing = build_batch_mixing(cfg, data.num_classes, *PIXEL_NORM)
    erased, _ = mixing(images, labels, epoch=0)
    assert (erased != images.float()).flatten(1).any(1).all()


def test_randaugment_posterize_at_zero_bits_does_not_raise():
    """timm's policies posterize to 0 bits at their top magnitudes, which Pillow ≥ 11 refuses."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from timm_dcl.data.transforms import train_transform

    train_transform((32, 32), (3, 32, 32), auto_augment="rand-m10-inc1")  # installs the 0-bit posterize
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(image)
    assert out.size == image.size and out.getpixel((0, 0)) == (0, 0, 0)
