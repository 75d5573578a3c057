"""timm_dcl.data on the real parquet copies in ../shared/data: loading, subsets, decoding, the
decoded-image cache, batched augmentation, normalisation and the batch loader."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from timm_dcl import data as D
from timm_dcl.data import memory as M
from timm_dcl.data import (BatchLoader, DatasetUnavailableError, GPUAugment, ImageData, Normalize,
                           apply_crop_flip, augment_batch, build_data, load_dataset_split, normalize,
                           sample_augment_params)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cifar10_small(cifar10_dir):
    return build_data("cifar10", data_dir=cifar10_dir, train_subset=200, eval_subset=100, seed=0, cache=False)


def _column(path: Path, name: str):
    import pyarrow.parquet as pq
    return pq.read_table(path, columns=[name]).column(name)


def _pil_rgb(blob: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_subset_shapes_balance_and_names(cifar10_small, cifar10_dir):
    s = cifar10_small
    assert s.num_classes == 10 and s.input_size == (3, 32, 32) and s.val is None
    for part, n in ((s.train, 200), (s.eval, 100)):
        assert part.images.shape == (n, 3, 32, 32) and part.images.dtype == torch.uint8
        assert part.labels.shape == (n,) and part.labels.dtype == torch.int64
        assert part.classes == CIFAR10_CLASSES and part.num_classes == 10 and len(part) == n
        assert torch.bincount(part.labels, minlength=10).tolist() == [n // 10] * 10
        assert len(set(part.indices.tolist())) == n
    # Labels and pixels are those of the source rows the subset names.
    src_labels = _column(cifar10_dir / "train.parquet", "label").to_numpy()
    assert np.array_equal(s.train.labels.numpy(), src_labels[s.train.indices.numpy()])
    eval_labels = _column(cifar10_dir / "test.parquet", "label").to_numpy()
    assert np.array_equal(s.eval.labels.numpy(), eval_labels[s.eval.indices.numpy()])
    imgs = _column(cifar10_dir / "train.parquet", "img")
    for k in (0, 57, 199):
        row = int(s.train.indices[k])
        expected = _pil_rgb(imgs[row]["bytes"].as_py())
        assert np.array_equal(s.train.images[k].permute(1, 2, 0).numpy(), expected)
    assert s.train.images.float().std() > 20  # real photographs, not blanks


def test_cifar10_subset_determinism(cifar10_small, cifar10_dir):
    again = build_data("cifar10", data_dir=cifar10_dir, train_subset=200, eval_subset=100, seed=0, cache=False)
    assert torch.equal(again.train.indices, cifar10_small.train.indices)
    assert torch.equal(again.train.images, cifar10_small.train.images)
    assert torch.equal(again.eval.indices, cifar10_small.eval.indices)
    other = build_data("cifar10", data_dir=cifar10_dir, train_subset=200, eval_subset=100, seed=1, cache=False)
    assert not torch.equal(other.train.indices, cifar10_small.train.indices)
    assert not torch.equal(other.eval.indices, cifar10_small.eval.indices)
    assert torch.bincount(other.train.labels, minlength=10).tolist() == [20] * 10
    # The one-split loader draws the same rows as build_data.
    one = load_dataset_split("cifar10", "train", data_dir=cifar10_dir, subset=200, seed=0, cache=False)
    assert torch.equal(one.indices, cifar10_small.train.indices) and torch.equal(one.images, cifar10_small.train.images)
    one = load_dataset_split("cifar10", "eval", data_dir=cifar10_dir, subset=100, seed=0, cache=False)
    assert torch.equal(one.indices, cifar10_small.eval.indices)


def test_cifar10_val_split_disjoint_and_balanced(cifar10_dir):
    s = build_data("cifar10", data_dir=cifar10_dir, train_subset=205, eval_subset=10, val_size=100, seed=3,
                   cache=False)
    assert s.val is not None and len(s.val) == 100 and len(s.train) == 205
    assert not set(s.val.indices.tolist()) & set(s.train.indices.tolist())
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [10] * 10
    # The remainder of 205 = 10·20 + 5 goes one each to the lowest class ids.
    assert torch.bincount(s.train.labels, minlength=10).tolist() == [21] * 5 + [20] * 5
    src_labels = _column(cifar10_dir / "train.parquet", "label").to_numpy()
    assert np.array_equal(s.val.labels.numpy(), src_labels[s.val.indices.numpy()])
    assert s.val.classes == CIFAR10_CLASSES


def test_split_helpers_on_real_labels(cifar10_dir):
    labels = _column(cifar10_dir / "train.parquet", "label").to_numpy()
    train, val = D.split_train_val(labels, val_size=5000, num_classes=10, seed=0)
    assert len(val) == 5000 and len(train) == 45000
    assert np.union1d(train, val).size == 50000  # everything, once
    assert np.bincount(labels[val], minlength=10).tolist() == [500] * 10
    sub = D.balanced_subset_indices(labels, 33, num_classes=10, seed=0)
    assert np.bincount(labels[sub], minlength=10).tolist() == [4] * 3 + [3] * 7
    # A class short of rows hands its shortfall to the others.
    skewed = np.array([0] * 2 + [1] * 50 + [2] * 50)
    picked = D.balanced_subset_indices(skewed, 30, num_classes=3, seed=0)
    assert np.bincount(skewed[picked], minlength=3).tolist() == [2, 14, 14]


# ---------------------------------------------------------------------------------------------
# CIFAR-100 layout (made here) and Tiny-ImageNet


def _write_cifar100_layout(root: Path, cifar10_dir: Path, fine: list[int]) -> None:
    import datasets
    from datasets import ClassLabel, Features, Image
    feats = Features({
        "img": Image(),
        "fine_label": ClassLabel(names=[f"fine{i}" for i in range(100)]),
        "coarse_label": ClassLabel(names=[f"coarse{i}" for i in range(20)]),
    })
    imgs = _column(cifar10_dir / "test.parquet", "img").to_pylist()
    # The hub's folder layout: plain_text/<split>-00000-of-00001.parquet
    (root / "plain_text").mkdir(parents=True)
    for split, offset in (("train", 0), ("test", len(fine))):
        rows = imgs[offset:offset + len(fine)]
        ds = datasets.Dataset.from_dict(
            {"img": rows, "fine_label": fine, "coarse_label": [f // 5 for f in fine]}).cast(feats)
        ds.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))


def test_cifar100_layout_from_parquet(tmp_path, cifar10_dir):
    fine = [0, 7, 42, 99, 3, 3, 64, 15, 80, 21, 55, 99]
    _write_cifar100_layout(tmp_path / "c100", cifar10_dir, fine)
    s = build_data("cifar100", data_dir=tmp_path / "c100", cache=False)
    assert s.num_classes == 100 and s.train.classes[:2] == ["fine0", "fine1"] and len(s.train.classes) == 100
    assert s.train.labels.tolist() == fine and s.eval.labels.tolist() == fine  # fine, not coarse labels
    imgs = _column(cifar10_dir / "test.parquet", "img")
    for k in (0, 11):
        expected = _pil_rgb(imgs[len(fine) + k]["bytes"].as_py())
        assert np.array_equal(s.eval.images[k].permute(1, 2, 0).numpy(), expected)
    # Balanced over the 10 classes present (3 and 99 have two rows): one each, and the eleventh
    # goes to the lowest class id with a row to spare.
    sub = build_data("cifar100", data_dir=tmp_path / "c100", train_subset=11, cache=False)
    assert sorted(sub.train.labels.tolist()) == sorted([*set(fine), 3]) and sub.num_classes == 100


def test_tiny_imagenet_subset(tiny_dir):
    s = build_data("tiny-imagenet", data_dir=tiny_dir, train_subset=400, eval_subset=200, seed=0, cache=False)
    assert s.num_classes == 200 and s.input_size == (3, 64, 64)
    assert s.train.images.shape == (400, 3, 64, 64) and s.eval.images.shape == (200, 3, 64, 64)
    assert torch.bincount(s.train.labels, minlength=200).tolist() == [2] * 200
    assert torch.bincount(s.eval.labels, minlength=200).tolist() == [1] * 200
    wnids = [line.split("\t")[1] for line in (tiny_dir / "classes.txt").read_text().splitlines() if line.strip()]
    assert s.train.classes == wnids


def test_tiny_imagenet_greyscale_becomes_rgb(tiny_dir):
    from PIL import Image
    blobs = _column(tiny_dir / "valid.parquet", "image").to_pylist()
    grey = [i for i, b in enumerate(blobs) if Image.open(io.BytesIO(b["bytes"])).mode != "RGB"]
    assert grey, "the Tiny-ImageNet copy is documented to hold greyscale images"
    ev = load_dataset_split("tiny-imagenet", "eval", data_dir=tiny_dir, cache=False)
    assert ev.images.shape == (2000, 3, 64, 64)
    img = ev.images[grey[0]]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert np.array_equal(img.permute(1, 2, 0).numpy(), _pil_rgb(blobs[grey[0]]["bytes"]))


# ---------------------------------------------------------------------------------------------
# the decoded-image cache


def test_cache_roundtrip_and_corruption(tmp_path, cifar10_dir, monkeypatch):
    monkeypatch.setattr(M, "MIN_CACHED_ROWS", 0)
    cache = tmp_path / "cache"
    first = build_data("cifar10", data_dir=cifar10_dir, train_subset=50, eval_subset=20, cache_dir=cache)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2 and not list(cache.glob("*.tmp"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(M, "decode_images", no_decode)
    second = build_data("cifar10", data_dir=cifar10_dir, train_subset=50, eval_subset=20, cache_dir=cache)
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.eval.images, second.eval.images)
    # A different subset is a different key: it must decode.
    with pytest.raises(AssertionError, match="decoded although cached"):
        build_data("cifar10", data_dir=cifar10_dir, train_subset=60, eval_subset=20, cache_dir=cache)
    monkeypatch.undo()
    monkeypatch.setattr(M, "MIN_CACHED_ROWS", 0)
    for f in files:
        f.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable image cache"):
        third = build_data("cifar10", data_dir=cifar10_dir, train_subset=50, eval_subset=20, cache_dir=cache)
    assert torch.equal(first.train.images, third.train.images)
    assert all(f.stat().st_size > 1000 for f in files)  # rewritten


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TIMM_DCL_CACHE", str(tmp_path))
    assert D.default_cache_dir() == tmp_path
    monkeypatch.setenv("TIMM_DCL_CACHE", "off")
    assert D.default_cache_dir() is None
    monkeypatch.delenv("TIMM_DCL_CACHE")
    assert D.default_cache_dir() == Path.home() / ".cache" / "timm_dcl"


# ---------------------------------------------------------------------------------------------
# errors


def test_error_unknown_dataset():
    with pytest.raises(ValueError, match="cifar10, cifar100, tiny-imagenet"):
        build_data("mnist", data_dir="/nonexistent")


def test_error_missing_dir_and_split(tmp_path, cifar10_dir):
    with pytest.raises(DatasetUnavailableError, match="not a directory"):
        build_data("cifar10", data_dir=tmp_path / "nope")
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train.parquet").symlink_to(cifar10_dir / "train.parquet")
    with pytest.raises(DatasetUnavailableError, match=r"no eval split .*test\.parquet"):
        build_data("cifar10", data_dir=only_train)


def test_error_bad_subsets(cifar10_dir):
    with pytest.raises(ValueError, match="train_subset=60000 exceeds the 50000"):
        build_data("cifar10", data_dir=cifar10_dir, train_subset=60000, cache=False)
    with pytest.raises(ValueError, match="after holding out val_size=49990"):
        build_data("cifar10", data_dir=cifar10_dir, train_subset=20, val_size=49990, cache=False)
    with pytest.raises(ValueError, match="eval_subset=10001 exceeds"):
        build_data("cifar10", data_dir=cifar10_dir, train_subset=10, eval_subset=10001, cache=False)
    with pytest.raises(ValueError, match="train_subset must be ≥ 1"):
        build_data("cifar10", data_dir=cifar10_dir, train_subset=0)
    with pytest.raises(ValueError, match="val_size must be ≥ 0"):
        build_data("cifar10", data_dir=cifar10_dir, val_size=-1)
    with pytest.raises(TypeError, match="eval_subset must be an int"):
        build_data("cifar10", data_dir=cifar10_dir, eval_subset=2.5)


def test_error_unknown_columns(tmp_path):
    import datasets
    root = tmp_path / "weird"
    root.mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"pixels": [b"x"], "target": [0]}).to_parquet(str(root / f"{split}.parquet"))
    with pytest.raises(ValueError, match="no image column.*columns found: pixels, target"):
        build_data("cifar10", data_dir=root)


def test_error_offline_hub_is_fast_and_clear(tmp_path):
    # A fresh interpreter: the hub libraries read the offline switches at import time.
    pkg_root = Path(D.__file__).resolve().parents[2]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([str(pkg_root), os.environ.get("PYTHONPATH", "")]))
    # One interpreter for both (its start dominates): a named data set's hub copy and any hfds/ id.
    code = ("from timm_dcl.data import build_data, DatasetUnavailableError\n"
            "for name in ('cifar100', 'hfds/nobody-here/no-such-dataset'):\n"
            "    try:\n        build_data(name)\n"
            "    except DatasetUnavailableError as e:\n        print('ERROR:', e)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    assert "ERROR: could not load 'uoft-cs/cifar100' from the Hugging Face hub (offline?)" in out.stdout
    assert "--data-dir DIR with train.parquet and test.parquet" in out.stdout
    assert "ERROR: could not load 'nobody-here/no-such-dataset' from the Hugging Face hub (offline?)" in out.stdout
    assert "--dataset parquet --data-dir DIR" in out.stdout
    assert out.stdout.count("ERROR:") == 2
    assert elapsed < 60


# ---------------------------------------------------------------------------------------------
# augmentation


def _manual(image: torch.Tensor, dy: int, dx: int, flip: bool, p: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    padded = F.pad(image[None].float(), (p, p, p, p), mode="reflect")[0]
    crop = padded[:, dy:dy + h, dx:dx + w]
    return (crop.flip(-1) if flip else crop).to(image.dtype)


@pytest.mark.parametrize("size,padding", [((32, 32), 4), ((64, 64), 8), ((20, 28), 5)])
def test_crop_flip_matches_manual_reflect_crop(device, size, padding):
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (16, 3, *size), dtype=torch.uint8, generator=g, device=device)
    offsets, flips = sample_augment_params(16, padding=padding, generator=g, device=device)
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding
    out = apply_crop_flip(images, offsets, flips, padding=padding)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for k in range(16):
        expected = _manual(images[k], int(offsets[k, 0]), int(offsets[k, 1]), bool(flips[k]), padding)
        assert torch.equal(out[k], expected), k
    # Extreme offsets hit the reflected border, pure flips just mirror.
    corners = torch.tensor([[0, 0], [2 * padding, 2 * padding]], device=device)
    out = apply_crop_flip(images[:2], corners, torch.tensor([False, True], device=device), padding=padding)
    assert torch.equal(out[0], _manual(images[0], 0, 0, False, padding))
    assert torch.equal(out[1], _manual(images[1], 2 * padding, 2 * padding, True, padding))
    centred = apply_crop_flip(images[:2], torch.full((2, 2), padding, device=device),
                              torch.tensor([False, True], device=device), padding=padding)
    assert torch.equal(centred[0], images[0]) and torch.equal(centred[1], images[1].flip(-1))


def test_augment_batch_generator_determinism(device):
    images = torch.arange(64 * 3 * 32 * 32, device=device).remainder(251).to(torch.uint8).view(64, 3, 32, 32)
    a = augment_batch(images, generator=torch.Generator(device=device).manual_seed(5))
    b = augment_batch(images, generator=torch.Generator(device=device).manual_seed(5))
    c = augment_batch(images, generator=torch.Generator(device=device).manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator(device=device).manual_seed(5)
    offsets, flips = sample_augment_params(64, padding=4, generator=g, device=device)
    assert torch.equal(a, apply_crop_flip(images, offsets, flips, padding=4))
    assert torch.equal(GPUAugment()(images, torch.Generator(device=device).manual_seed(5)), a)
    # float in, float out
    f = augment_batch(images.float(), generator=torch.Generator(device=device).manual_seed(5))
    assert f.dtype == torch.float32 and torch.equal(f, a.float())
    assert torch.equal(augment_batch(images, padding=0, flip=False), images)


def test_augment_distribution_and_defaults():
    g = torch.Generator().manual_seed(0)
    offsets, flips = sample_augment_params(4000, padding=4, generator=g)
    assert sorted(offsets.unique().tolist()) == list(range(9))
    assert 0.45 < flips.float().mean().item() < 0.55
    assert D.default_padding(32, 32) == 4 and D.default_padding(64, 64) == 8
    _, no_flips = sample_augment_params(10, padding=4, flip=False, generator=g)
    assert not no_flips.any()
    with pytest.raises(ValueError, match="padding must lie in"):
        augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), padding=8)
    with pytest.raises(ValueError, match="tensor \\[N, C, H, W\\]"):
        augment_batch(torch.zeros(3, 8, 8, dtype=torch.uint8))


def test_augment_real_images_preserves_pixels(cifar10_small):
    images = cifar10_small.train.images[:32]
    out = augment_batch(images, generator=torch.Generator().manual_seed(1))
    # A crop of a reflect-padded image only rearranges existing pixels of each image.
    for k in range(4):
        assert set(out[k].flatten().tolist()) <= set(images[k].flatten().tolist())
    assert not torch.equal(out, images)


# ---------------------------------------------------------------------------------------------
# normalisation


def test_normalize_values(device):
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, device=device)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    expected = (x.double() / 255 - torch.tensor(mean, device=device).double().view(1, 3, 1, 1)) \
        / torch.tensor(std, device=device).double().view(1, 3, 1, 1)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float())
    torch.testing.assert_close(normalize(x.float() / 255, mean, std), out)
    torch.testing.assert_close(normalize(x[0], mean, std), out[0])
    module = Normalize(mean, std).to(device)
    torch.testing.assert_close(module(x), out)
    assert module.state_dict() == {}  # fixed by config, not checkpointed
    assert torch.equal(normalize(x, 0.0, 1.0), x.float() / 255)
    with pytest.raises(ValueError, match="mean has 2 values but the images have 3 channels"):
        normalize(x, (0.5, 0.5), std)
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize(mean, (0.2, 0.0, 0.2))


# ---------------------------------------------------------------------------------------------
# batching


def _synthetic(n: int, classes: int = 5) -> ImageData:
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    return ImageData(images=images.contiguous(), labels=torch.arange(n) % classes,
                     classes=[str(i) for i in range(classes)])


def test_batch_loader_epochs_are_seeded():
    data = _synthetic(103)
    a, b = BatchLoader(data, 10, seed=7), BatchLoader(data, 10, seed=7)
    assert len(a) == 11
    a.set_epoch(3)
    b.set_epoch(3)
    assert torch.equal(a.epoch_indices(), b.epoch_indices())
    assert sorted(a.epoch_indices().tolist()) == list(range(103))
    assert not torch.equal(a.epoch_indices(3), a.epoch_indices(4))
    assert torch.equal(a.epoch_indices(3), torch.randperm(103, generator=torch.Generator().manual_seed(10)))
    seen = []
    for images, labels in a:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 2, 2)
        rows = a.epoch_indices()[len(seen) * 10:][:len(labels)]
        assert torch.equal(images[:, 0, 0, 0], rows.to(torch.uint8))  # pixel value = row index
        seen.append(labels)
    assert torch.equal(torch.cat(seen), data.labels[a.epoch_indices()])
    assert [len(x) for x in seen] == [10] * 10 + [3]
    unshuffled = BatchLoader(data, 50, shuffle=False)
    assert torch.equal(unshuffled.epoch_indices(5), torch.arange(103))


def test_batch_loader_shards_and_drop_last():
    data = _synthetic(103)
    shards = [BatchLoader(data, 8, seed=1, num_shards=3, shard_index=r) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    parts = [s.epoch_indices() for s in shards]
    assert all(len(p) == 34 for p in parts)
    union = torch.cat(parts)
    assert len(set(union.tolist())) == 102  # disjoint; one image (103 % 3) sits this epoch out
    full = BatchLoader(data, 8, seed=1).epoch_indices(2)
    assert torch.equal(union, full[:102])  # the same permutation on every rank
    even = [BatchLoader(_synthetic(100), 8, num_shards=4, shard_index=r).epoch_indices() for r in range(4)]
    assert sorted(torch.cat(even).tolist()) == list(range(100))
    dropped = BatchLoader(data, 10, drop_last=True)
    assert len(dropped) == 10 and [len(x) for x, _ in dropped] == [10] * 10
    assert len(shards[0]) == 5 and [len(y) for _, y in shards[0]] == [8, 8, 8, 8, 2]
    with pytest.raises(ValueError, match="shard_index"):
        BatchLoader(data, 8, num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="batch_size must be ≥ 1"):
        BatchLoader(data, 0)


def test_batch_loader_device(device):
    data = _synthetic(20)
    loader = BatchLoader(data, 6, device=device)
    images, labels = next(iter(loader))
    assert images.device.type == device.type and labels.device.type == device.type
    assert torch.equal(labels.cpu(), data.labels[loader.epoch_indices()[:6]])


def test_image_data_validation():
    with pytest.raises(ValueError, match="uint8"):
        ImageData(images=torch.zeros(2, 3, 4, 4), labels=torch.zeros(2, dtype=torch.long), classes=["a"])
    with pytest.raises(ValueError, match="labels must lie in"):
        ImageData(images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels=torch.tensor([0, 2]), classes=["a", "b"])


def test_per_sample_dataset_baseline(cifar10_small):
    ds = D.make_torch_dataset(cifar10_small.train, D.per_sample_train_transform(32))
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and labels.dtype == torch.int64
    raw = D.make_torch_dataset(cifar10_small.train)
    img, label = raw[3]
    assert torch.equal(img, cifar10_small.train.images[3]) and label == int(cifar10_small.train.labels[3])


def test_decode_images_pool_and_chunks_agree(cifar10_dir, monkeypatch):
    blobs = [b["bytes"] for b in _column(cifar10_dir / "test.parquet", "img").slice(0, 40).to_pylist()]
    whole = D.decode_images(blobs, num_workers=1)
    monkeypatch.setattr(M, "_MIN_POOL_ROWS", 0)
    monkeypatch.setattr(M, "_DECODE_CHUNK", 7)
    assert torch.equal(D.decode_images(blobs, num_workers=2), whole)  # forked pool, chunks placed in order
    assert torch.equal(D.decode_images(blobs, num_workers=1), whole)  # in-process, 7 rows at a time
    assert np.array_equal(whole[39].permute(1, 2, 0).numpy(), _pil_rgb(blobs[39]))
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (20, 24)).save(buf, format="PNG")
    with pytest.raises(ValueError, match=r"images differ in size.*pass input_size"):
        D.decode_images(blobs[:10] + [buf.getvalue()], num_workers=1)  # the odd one in another chunk
