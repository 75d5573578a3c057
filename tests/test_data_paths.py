"""The two ways timm_dcl.data feeds the trainer, on real images (the Tiny-ImageNet subset, and a
parquet/folder made from it): choosing the path, resizing to an input size, the train and eval
loaders (order, shards, coverage, augmentation, reproducibility), and the streaming path's memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from timm_dcl.data import (ImageData, RandomResizedCropFlip, build_data, resized_crop_flip, sample_rrc_boxes)


def _tiny(tiny_dir, **kw):
    kw = {"train_subset": 200, "eval_subset": 100, "cache": False, **kw}
    return build_data("tiny-imagenet", data_dir=tiny_dir, **kw)


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------------------------
# choosing the path


def test_in_memory_auto_and_forced(tiny_dir):
    # 200 train + 100 eval images of 3·64·64 bytes
    need = 300 * 3 * 64 * 64
    assert _tiny(tiny_dir, memory_budget=need).in_memory is True
    streamed = _tiny(tiny_dir, memory_budget=need - 1)
    assert streamed.in_memory is False and not hasattr(streamed.train, "images")
    assert _tiny(tiny_dir, in_memory=True, memory_budget=0).in_memory is True
    assert _tiny(tiny_dir, in_memory=False, memory_budget=1 << 40).in_memory is False
    assert _tiny(tiny_dir).in_memory is True  # a few MB fit the default budget anywhere


# ---------------------------------------------------------------------------------------------
# input size


@pytest.mark.parametrize("side", [32, 96])
def test_input_size_resize(tiny_dir, side):
    mem = _tiny(tiny_dir, input_size=side, in_memory=True)
    stream = _tiny(tiny_dir, input_size=(3, side, side), in_memory=False)
    assert mem.input_size == stream.input_size == (3, side, side)
    # eval: timm's resize to side/0.875 and centre crop, the same pixels on both paths
    ev_mem, lab_mem = _all(mem.eval_loader("eval", 32))
    ev_stream, lab_stream = _all(stream.eval_loader("eval", 32, workers=0))
    assert ev_mem.shape == (100, 3, side, side) and torch.equal(ev_mem, ev_stream) and torch.equal(lab_mem, lab_stream)
    from timm.data import create_transform
    from timm_dcl.data import open_source
    from timm_dcl.data.sources import pil_rgb
    tf = create_transform((3, side, side), is_training=False, use_prefetcher=True)
    src = mem.train  # the in-memory train split keeps its native 64 px
    assert tuple(src.images.shape[-2:]) == (64, 64)
    rows = mem.eval.indices
    blobs, paths = open_source("tiny-imagenet", data_dir=tiny_dir).splits["eval"].encoded(rows[:3].numpy())
    for k in range(3):
        assert torch.equal(ev_mem[k], tf(pil_rgb(blobs[k], paths[k], k)))
    # train: a random-resized crop to the input size on both paths
    for data in (mem, stream):
        loader = data.train_loader(50, seed=0, workers=0)
        x, y = next(iter(loader))
        x = loader.augment(x, torch.Generator().manual_seed(0))
        assert x.shape == (50, 3, side, side) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.float().std() > 20


def test_crop_pct_applies_even_at_native_size(tiny_dir):
    plain = _tiny(tiny_dir, in_memory=True)
    cropped = _tiny(tiny_dir, in_memory=True, crop_pct=0.5)
    assert plain.input_size == cropped.input_size == (3, 64, 64)
    # native size and no crop_pct: the stored pixels; crop_pct=0.5: a 2× zoom on the centre
    assert torch.equal(plain.eval.images, _tiny(tiny_dir, in_memory=False).eval_loader("eval", 100).__iter__()
                       .__next__()[0])
    assert not torch.equal(plain.eval.images, cropped.eval.images)
    zoom = F.interpolate(plain.eval.images[:4, :, 16:48, 16:48].float(), scale_factor=2, mode="bilinear")
    assert (zoom - cropped.eval.images[:4].float()).abs().mean() < 6


# ---------------------------------------------------------------------------------------------
# loaders


@pytest.mark.parametrize("in_memory", [True, False])
def test_eval_covers_each_sample_once_over_two_shards(tiny_parquet_renamed, in_memory):
    data = build_data("parquet", data_dir=tiny_parquet_renamed, in_memory=in_memory, cache=False, val_size=10)
    for split in ("eval", "val"):
        whole_x, whole_y = _all(data.eval_loader(split, 8, workers=0))
        assert len(whole_y) == data.split_size(split)
        parts = [_all(data.eval_loader(split, 8, num_shards=2, shard_index=r, workers=0)) for r in range(2)]
        assert [len(p[1]) for p in parts] == [(len(whole_y) + 1) // 2, len(whole_y) // 2]
        # shard r holds samples r, r+2, r+4, …: interleaved back they are the whole split, once
        merged_x = torch.empty_like(whole_x)
        merged_y = torch.empty_like(whole_y)
        for r, (x, y) in enumerate(parts):
            merged_x[r::2], merged_y[r::2] = x, y
        assert torch.equal(merged_x, whole_x) and torch.equal(merged_y, whole_y)


@pytest.mark.parametrize("in_memory", [True, False])
def test_train_shards_disjoint_equal_and_seeded(tiny_dir, in_memory):
    data = _tiny(tiny_dir, in_memory=in_memory, train_subset=203)
    shards = [data.train_loader(16, seed=5, num_shards=2, shard_index=r, workers=0) for r in range(2)]
    for epoch in (0, 3):
        rows = [s.epoch_indices(epoch) for s in shards]
        assert len(rows[0]) == len(rows[1]) == 101 and len(shards[0]) == len(shards[1]) == 7
        assert not set(rows[0].tolist()) & set(rows[1].tolist())
        assert set(rows[0].tolist()) | set(rows[1].tolist()) <= set(data.train.indices.tolist())
    assert not torch.equal(shards[0].epoch_indices(0), shards[0].epoch_indices(1))
    # what a shard yields is what epoch_indices names, and the order is a function of (seed, epoch)
    shards[1].set_epoch(3)
    _, labels = _all(shards[1])
    row_label = dict(zip(data.train.indices.tolist(), data.train.labels.tolist()))
    assert labels.tolist() == [row_label[r] for r in shards[1].epoch_indices(3).tolist()]
    again = data.train_loader(16, seed=5, num_shards=2, shard_index=1, workers=0)
    assert torch.equal(again.epoch_indices(3), shards[1].epoch_indices(3))
    with pytest.raises(ValueError, match="shard_index"):
        data.train_loader(16, seed=0, num_shards=2, shard_index=2)


def test_both_paths_share_the_epoch_order(tiny_dir):
    mem, stream = _tiny(tiny_dir, in_memory=True), _tiny(tiny_dir, in_memory=False)
    a = mem.train_loader(32, seed=1, num_shards=3, shard_index=1)
    b = stream.train_loader(32, seed=1, num_shards=3, shard_index=1, workers=0)
    assert torch.equal(a.epoch_indices(2), b.epoch_indices(2)) and len(a) == len(b)


def test_streaming_train_augmentation_reproducible_across_workers(tiny_dir):
    data = _tiny(tiny_dir, in_memory=False, train_subset=40)
    assert data.train.train_transform is not None

    def epoch(workers, e, seed=0):
        loader = data.train_loader(8, seed=seed, workers=workers)
        loader.set_epoch(e)
        return _all(loader)[0]

    torch.manual_seed(123)
    outside = torch.rand(3)
    a = epoch(0, 1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), outside)  # the trainer's RNG is left where it was
    assert torch.equal(a, epoch(2, 1))  # the same crops whichever worker made them
    assert not torch.equal(a, epoch(0, 2)) and not torch.equal(a, epoch(0, 1, seed=1))


def test_native_small_images_get_the_reflect_pad_crop_on_both_paths(tiny_dir):
    for in_memory in (True, False):
        data = _tiny(tiny_dir, in_memory=in_memory, train_subset=40)
        loader = data.train_loader(40, seed=0, workers=0)
        x, _ = next(iter(loader))
        x = loader.augment(x, torch.Generator().manual_seed(0))
        originals = _tiny(tiny_dir, in_memory=True, train_subset=40).train
        pos = {r: k for k, r in enumerate(originals.indices.tolist())}
        changed = 0
        for k, row in enumerate(loader.epoch_indices(0).tolist()):
            orig = originals.images[pos[row]]
            # a crop of a reflect-padded image, maybe mirrored: the middle 48×48 block of the
            # original appears, intact, somewhere in it (the offsets are at most 8 px)
            centre = orig[:, 8:56, 8:56]
            changed += not torch.equal(x[k], orig)
            if k >= 12:  # the search below is slow-ish; a dozen images per path make the point
                continue
            found = False
            for cand in (x[k], x[k].flip(-1)):
                windows = cand.unfold(1, 48, 1).unfold(2, 48, 1)  # [3, 17, 17, 48, 48]
                found |= bool((windows == centre[:, None, None]).all(-1).all(-1).all(0).any())
            assert found, (in_memory, k)
        assert changed > 30


# ---------------------------------------------------------------------------------------------
# batched random-resized-crop


def test_resized_crop_flip_exact_cases(device):
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 12), dtype=torch.uint8, generator=g, device=device)
    full = torch.tensor([[0, 0, 16, 12]] * 4, device=device)
    none = torch.zeros(4, dtype=torch.bool, device=device)
    assert torch.equal(resized_crop_flip(images, full, none, (16, 12)), images)
    flips = torch.tensor([True, False, True, False], device=device)
    out = resized_crop_flip(images, full, flips, (16, 12))
    assert torch.equal(out[0], images[0].flip(-1)) and torch.equal(out[1], images[1])
    # halving averages each 2×2 block (antialiased, unlike plain bilinear sampling)
    half = resized_crop_flip(images, full, none, (8, 6))
    expected = F.avg_pool2d(images.float(), 2).round().to(torch.uint8)
    assert (half.int() - expected.int()).abs().max() <= 1
    # a box picks its region: the bottom-right 8×6 quarter at its own size
    quarter = resized_crop_flip(images, torch.tensor([[8, 6, 8, 6]] * 4, device=device), none, (8, 6))
    assert torch.equal(quarter, images[:, :, 8:, 6:])


def test_rrc_boxes_follow_torchvision_rules():
    boxes = sample_rrc_boxes(5000, 64, 48, generator=torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    area = (h * w).float() / (64 * 48)
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.4 < area.mean() < 0.65
    assert len({tuple(b) for b in boxes.tolist()}) > 4000
    # an impossible scale falls back to the centre crop with the aspect clamped into ratio
    wide = sample_rrc_boxes(3, 10, 40, scale=(2.0, 3.0), generator=torch.Generator().manual_seed(0))
    assert wide.tolist() == [[0, 13, 10, 13]] * 3  # 40 wide: 10·4/3 ≈ 13 wide, centred
    aug = RandomResizedCropFlip((24, 24))
    x = torch.randint(0, 256, (6, 3, 64, 48), dtype=torch.uint8)
    a, b = aug(x, torch.Generator().manual_seed(3)), aug(x, torch.Generator().manual_seed(3))
    assert a.shape == (6, 3, 24, 24) and a.dtype == torch.uint8 and torch.equal(a, b)


def test_in_memory_augment_is_chosen_by_stored_and_input_size(tiny_dir):
    from timm_dcl.data import GPUAugment
    native = _tiny(tiny_dir, in_memory=True, train_subset=20)
    assert isinstance(native.train_loader(8, seed=0)._augment, GPUAugment)
    smaller = _tiny(tiny_dir, in_memory=True, train_subset=20, input_size=48)
    assert isinstance(smaller.train_loader(8, seed=0)._augment, RandomResizedCropFlip)


def test_data_splits_built_by_hand_still_work():
    images = torch.arange(10 * 3 * 4 * 4).remainder(256).to(torch.uint8).view(10, 3, 4, 4)
    part = ImageData(images=images, labels=torch.arange(10) % 2, classes=["a", "b"])
    from timm_dcl.data import DataSplits
    data = DataSplits(part, part, None, 2, (3, 4, 4))
    assert data.in_memory and data.classes == ["a", "b"] and data.split_size("eval") == 10
    x, y = _all(data.eval_loader("eval", 3))
    assert torch.equal(x, images)
    loader = data.train_loader(4, seed=0)
    assert torch.equal(loader.epoch_indices(0), torch.randperm(10, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------
# memory: the streaming path's peak does not grow with the data set

_MEASURE = r"""
import json, sys, threading, time
import torch
# imported first: the libraries' own memory is not the data's
import datasets, timm.data, torchvision.ops
from timm_dcl.data import build_data, open_source

def anon_kib():
    # resident anonymous memory: what the process itself holds, not the memory-mapped Arrow
    # files (page cache the kernel can drop)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

def one_epoch(path, in_memory):
    start = anon_kib()
    peak = [start]
    stop = []
    def watch():
        while not stop:
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.002)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    data = build_data("parquet", data_dir=path, in_memory=in_memory, cache=False, num_workers=1)
    loader = data.train_loader(64, seed=0, workers=0)
    n = 0
    for x, y in loader:
        x = loader.augment(x, None)
        n += len(y)
        peak[0] = max(peak[0], anon_kib())
    stop.append(1)
    t.join()
    high[0] = max(high[0], peak[0])
    # growth: over this phase's start; high: the process's high-water mark over the first start
    return {"images": n, "growth_mib": (peak[0] - start) / 1024, "high_mib": (high[0] - base) / 1024}

runs = list(zip(sys.argv[1::2], sys.argv[2::2]))
for path, _ in runs:  # datasets converts parquet to Arrow files once, in batches: not the loaders' memory
    open_source("parquet", data_dir=path)
# a few batches first, so one-time costs (lazy imports, allocator pools) are not counted
warm = build_data("parquet", data_dir=runs[0][0], train_subset=128, in_memory=False)
for _ in warm.train_loader(64, seed=0, workers=0):
    pass
del warm
base = anon_kib()
high = [base]
print(json.dumps([one_epoch(path, flag == "1") for path, flag in runs]))
"""


def _peak_growth(*runs) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [a for path, in_memory in runs for a in (str(path), "1" if in_memory else "0")]
    out = subprocess.run([sys.executable, "-c", _MEASURE, *args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_streaming_peak_memory_does_not_grow_with_the_data(tmp_path, tiny_rows, shared_data):
    from conftest import tiny_wnids, write_tiny_parquet
    # 720 and 2880 training rows (8 and 34 MiB decoded) made of the same 60 JPEGs
    small = write_tiny_parquet(tmp_path / "x1", tiny_rows, tiny_wnids(shared_data), repeat=12)
    large = write_tiny_parquet(tmp_path / "x4", tiny_rows, tiny_wnids(shared_data), repeat=4 * 12)
    # one process: 1× streamed, then 4× streamed, then 4× in memory
    s1, s4, m4 = _peak_growth((small, False), (large, False), (large, True))
    assert s4["images"] == 4 * s1["images"] == m4["images"]
    decoded_mib = m4["images"] * 3 * 64 * 64 / 2 ** 20
    # streaming holds a few batches: 4× the rows leave the process's high-water mark where 1× put it
    assert s1["growth_mib"] < 0.25 * decoded_mib
    assert s4["high_mib"] - s1["high_mib"] < 0.1 * decoded_mib
    # the in-memory path holds the decoded splits, at least
    assert m4["growth_mib"] > decoded_mib
