"""The in-memory path: decode a split once into uint8 ``[N, 3, H, W]`` (cached on disk), slice
batches out of it (on the device if asked)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import SourceSplit, pil_rgb
from .splits import _check_count, check_sharding, shard_positions

__all__ = ["ImageData", "decode_images", "default_cache_dir", "BatchLoader", "InMemoryTrainLoader",
           "InMemoryEvalLoader", "ImageTensorDataset",
           "make_torch_dataset", "MIN_CACHED_ROWS", "decode_split"]

# Decoding this few rows is cheaper than a cache round-trip; below it nothing is cached.
MIN_CACHED_ROWS = 4096
# Rows below which a process pool costs more than it saves.
_MIN_POOL_ROWS = 4096
_CACHE_FORMAT = 1
# Rows decoded at a time without a pool (bounds the transient HWC copy).
_DECODE_CHUNK = 1024


@dataclass
class ImageData:
    """One decoded split: uint8 RGB images ``[N, 3, H, W]`` and int64 labels ``[N]``."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    #: Row of each image in its source split (for subsets: which rows were drawn).
    indices: Optional[torch.Tensor] = None

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [N, C, H, W]")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1 \
                or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels must be a tensor [N] with N = {self.images.shape[0]} (the image count)")
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.long()
        if len(self.classes) < 1:
            raise ValueError("classes must name at least one class")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.images.shape[0]



def _decode_one(blob: Optional[bytes], path: Optional[str], row: int, transform=None) -> np.ndarray:
    im = pil_rgb(blob, path, row)
    if transform is None:
        return np.asarray(im)
    # timm's transforms with use_prefetcher=True end in a uint8 CHW tensor; stored HWC like the rest
    return np.asarray(transform(im)).transpose(1, 2, 0)


def _decode_chunk(args) -> np.ndarray:
    blobs, paths, first_row, transform = args
    out = None
    for i, (blob, path) in enumerate(zip(blobs, paths)):
        arr = _decode_one(blob, path, first_row + i, transform)
        if out is None:
            out = np.empty((len(blobs),) + arr.shape, dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise ValueError(f"images differ in size: row {first_row} is {out.shape[1:3]}, "
                             f"row {first_row + i} is {arr.shape[:2]}; pass input_size (--input-size) "
                             f"to resize them")
        out[i] = arr
    return out


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def decode_images(blobs: Sequence[Optional[bytes]], paths: Optional[Sequence[Optional[str]]] = None, *,
                  num_workers: Optional[int] = None, transform=None) -> torch.Tensor:
    """Decode encoded images (JPEG/PNG, …) with PIL into one uint8 tensor ``[N, 3, H, W]`` (RGB).

    ``transform`` (PIL image → uint8 CHW tensor, e.g. timm's eval transform with
    ``use_prefetcher=True``) is applied to each image. All images must come out one size. Large
    batches are decoded by a pool of forked processes.
    """
    n = len(blobs)
    paths = [None] * n if paths is None else list(paths)
    if n == 0:
        raise ValueError("no images to decode")
    workers = _default_workers() if num_workers is None else max(1, int(num_workers))
    import multiprocessing as mp
    pooled = workers > 1 and n >= _MIN_POOL_ROWS and "fork" in mp.get_all_start_methods()
    step = math.ceil(n / (workers * 4)) if pooled else _DECODE_CHUNK
    jobs = [(list(blobs[i:i + step]), paths[i:i + step], i, transform) for i in range(0, n, step)]
    # Each chunk is copied into one preallocated [N, 3, H, W] tensor as it arrives and dropped:
    # the split is held about once, not as chunks, plus their concatenation, plus its transpose.
    out: Optional[torch.Tensor] = None
    if pooled:
        from concurrent.futures import ProcessPoolExecutor
        # fork: the workers need only PIL/numpy, and spawning would re-import torch in each.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for job, chunk in zip(jobs, pool.map(_decode_chunk, jobs)):
                out = _place(out, n, job[2], chunk)
    else:
        for job in jobs:
            out = _place(out, n, job[2], _decode_chunk(job))
    return out


def _place(out: Optional[torch.Tensor], n: int, start: int, chunk: np.ndarray) -> torch.Tensor:
    if out is None:
        out = torch.empty((n, chunk.shape[3], chunk.shape[1], chunk.shape[2]), dtype=torch.uint8)
    elif tuple(out.shape[2:]) != chunk.shape[1:3] or out.shape[1] != chunk.shape[3]:
        raise ValueError(f"images differ in size: {tuple(out.shape[2:])} and {chunk.shape[1:3]}; pass input_size "
                         f"(--input-size) to resize them")
    out[start:start + len(chunk)] = torch.from_numpy(chunk).permute(0, 3, 1, 2)
    return out



# ---------------------------------------------------------------------------------------------
# on-disk cache of decoded images


def default_cache_dir() -> Optional[Path]:
    """``$TIMM_DCL_CACHE`` or ``~/.cache/timm_dcl``; None when the variable is set to off/0/none/''."""
    env = os.environ.get("TIMM_DCL_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none", "false") else Path(env).expanduser()
    return Path.home() / ".cache" / "timm_dcl"


def _cache_path(cache_dir: Path, name: str, split: SourceSplit, rows: np.ndarray, transform) -> tuple[Path, str]:
    rows_hash = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()
    what = [_CACHE_FORMAT, split.fingerprint(), split.name, getattr(split, "image_col", None), len(rows), rows_hash]
    if transform is not None:  # resized copies are other images; the transform's repr names its sizes
        what.append(repr(transform))
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()
    return cache_dir / f"{name}-{split.name}-{len(rows)}-{key[:20]}.pt", key


def _cache_load(path: Path, key: str, n: int) -> Optional[torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated/corrupt: decode again and overwrite
        warnings.warn(f"ignoring unreadable image cache {path}: {e}")
        return None
    images = blob.get("images") if isinstance(blob, dict) else None
    if blob.get("key") != key or not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
            or images.dim() != 4 or images.shape[0] != n:
        return None
    return images


def _cache_save(path: Path, key: str, images: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: readers in other processes never see a partial file.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": key, "images": images}, f)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache should be readable
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:  # a read-only or full cache disk must not stop training
        warnings.warn(f"could not write image cache {path}: {e}")


def decode_split(name: str, split: SourceSplit, rows: np.ndarray, classes: list[str], *,
                 cache_dir: Optional[Path], num_workers: Optional[int], transform=None) -> ImageData:
    """Decode ``rows`` of ``split`` (through ``transform`` if given), from the cache when it has them."""
    if len(rows) == 0:
        raise ValueError(f"split {split.name!r} selects no images")
    images = None
    use_cache = cache_dir is not None and len(rows) >= MIN_CACHED_ROWS
    if use_cache:
        path, key = _cache_path(cache_dir, name, split, rows, transform)
        images = _cache_load(path, key, len(rows))
    if images is None:
        blobs, paths = split.encoded(rows)
        images = decode_images(blobs, paths, num_workers=num_workers, transform=transform)
        if use_cache:
            _cache_save(path, key, images)
    return ImageData(images=images, labels=torch.from_numpy(split.labels[rows].copy()), classes=classes,
                     indices=torch.from_numpy(np.asarray(rows, dtype=np.int64)))


# ---------------------------------------------------------------------------------------------
# batching


class BatchLoader:
    """Batches ``(images_uint8, labels)`` out of an in-memory :class:`ImageData`.

    The order of an epoch is a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)``,
    identical on every rank; with ``num_shards`` > 1 each rank takes its own contiguous,
    equal-size slice of it (the last ``N % num_shards`` images of the permutation are left out
    that epoch). ``device`` moves the whole split there once, so batches are sliced on the device.
    """

    def __init__(self, data: ImageData, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_shards: int = 1, shard_index: int = 0,
                 device: Union[str, torch.device, None] = None, pin_memory: bool = False):
        if not isinstance(data, ImageData):
            raise TypeError(f"data must be an ImageData, got {type(data).__name__}")
        check_sharding(len(data), batch_size, num_shards, shard_index)
        self.images, self.labels = data.images, data.labels
        if device is not None:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.pin_memory = bool(pin_memory) and self.images.device.type == "cpu"
        if self.pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but no CUDA device is available; not pinning")
            self.pin_memory = False
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.seed = _check_count("seed", seed)
        self.num_shards, self.shard_index = int(num_shards), int(shard_index)
        self.epoch = 0
        self.per_shard = len(data) // num_shards

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_count("epoch", epoch)

    def epoch_positions(self, epoch: Optional[int] = None) -> torch.Tensor:
        """This shard's positions in the split for ``epoch`` (default: the current one), int64 on the CPU."""
        return shard_positions(self.images.shape[0], seed=self.seed, epoch=self.epoch if epoch is None else epoch,
                               num_shards=self.num_shards, shard_index=self.shard_index, shuffle=self.shuffle)

    def epoch_indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """This shard's row order for ``epoch`` (positions in the :class:`ImageData`)."""
        return self.epoch_positions(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_shard // self.batch_size
        return math.ceil(self.per_shard / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch ``start`` on (a resume in the middle of an epoch)."""
        order = self.epoch_positions().to(self.images.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            images, labels = self.images[idx], self.labels[idx]
            if self.pin_memory:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels


class InMemoryTrainLoader(BatchLoader):
    """:class:`BatchLoader` with the trainer's interface: ``epoch_indices`` names source rows, and
    ``augment(images, generator)`` is the batched augmentation to run on the device."""

    def __init__(self, data: ImageData, batch_size: int, *, augment, seed: int, **kwargs):
        super().__init__(data, batch_size, shuffle=True, seed=seed, **kwargs)
        self.rows = data.indices if data.indices is not None else torch.arange(len(data))
        self._augment = augment

    def epoch_indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """The source rows this shard sees in ``epoch``, in order."""
        return self.rows[self.epoch_positions(epoch)]

    def augment(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self._augment(images, generator)


class InMemoryEvalLoader:
    """Every ``num_shards``-th image from ``shard_index`` on, in order, moved to ``device`` once:
    make it once and iterate it every evaluation."""

    def __init__(self, data: ImageData, batch_size: int = 256, *, num_shards: int = 1, shard_index: int = 0,
                 device: Union[str, torch.device, None] = None):
        check_sharding(len(data), batch_size, num_shards, shard_index)
        if num_shards == 1:  # no copy of the split
            self.images, self.labels = data.images, data.labels
        else:
            take = torch.arange(shard_index, len(data), num_shards)
            self.images, self.labels = data.images[take], data.labels[take]
        if device is not None:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.images.shape[0], self.batch_size):
            yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]


# ---------------------------------------------------------------------------------------------
# per-sample baseline (a standard Dataset for a torch DataLoader)


class ImageTensorDataset(Dataset):
    """``(transform(image_uint8_chw), label)`` per index, for a per-sample ``DataLoader``."""

    def __init__(self, data: ImageData, transform=None):
        self.images, self.labels, self.transform = data.images, data.labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform is not None else image), int(self.labels[i])


def make_torch_dataset(data: ImageData, transform=None) -> ImageTensorDataset:
    return ImageTensorDataset(data, transform)

