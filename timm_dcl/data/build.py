"""build_data / load_dataset_split: open a source, draw the subsets, pick the in-memory or the
streaming path, and hand the trainer one interface for both (:class:`DataSplits`)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .augment import batch_train_augment
from .memory import ImageData, InMemoryEvalLoader, InMemoryTrainLoader, decode_split, default_cache_dir
from .sources import Source, SourceSplit, open_source
from .splits import _check_count, balanced_subset_indices, split_train_val
from .streaming import StreamingEvalLoader, StreamingTrainLoader, StreamSplit
from .transforms import eval_transform, storage_transform, train_transform

__all__ = ["DataSplits", "DataInfo", "build_data", "describe_data", "load_dataset_split", "default_memory_budget"]

#: timm's default eval crop (``timm.data.DEFAULT_CROP_PCT``), also the margin kept around the
#: input size when training images of mixed sizes are stored in memory.
_DEFAULT_CROP_PCT = 0.875
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
# Headers read to find the images' size without decoding (per split).
_SIZE_PROBES = 16


@dataclass
class DataSplits:
    """Train, evaluation (the source's test/valid split) and optional validation (held out of train).

    Each split is an :class:`ImageData` (decoded, ``in_memory``) or a
    :class:`~.streaming.StreamSplit` (kept encoded). Either way :meth:`train_loader` and
    :meth:`eval_loader` yield uint8 ``[B, 3, H, W]`` batches at ``input_size`` with int64 labels.
    """
    train: Union[ImageData, StreamSplit]
    eval: Union[ImageData, StreamSplit]
    val: Optional[Union[ImageData, StreamSplit]]
    num_classes: int
    input_size: tuple[int, int, int]
    classes: list[str] = field(default_factory=list)
    in_memory: bool = True
    #: DataLoader workers of the streaming path when a loader is not told otherwise.
    num_workers: Optional[int] = None

    def __post_init__(self):
        if not self.classes:
            self.classes = list(self.train.classes)
        self.in_memory = isinstance(self.train, ImageData)

    def _split(self, split: str):
        if split not in ("train", "eval", "val"):
            raise ValueError(f"split must be 'train', 'eval' or 'val', got {split!r}")
        part = getattr(self, split)
        if part is None:
            raise ValueError("no 'val' split: build the data with val_size > 0 to hold one out of train")
        return part

    def split_size(self, split: str = "eval") -> int:
        return len(self._split(split))

    def train_loader(self, batch_size: int, *, seed: int, num_shards: int = 1, shard_index: int = 0,
                     device: Union[str, torch.device, None] = None, drop_last: bool = False,
                     workers: Optional[int] = None):
        """Batches of this shard's share of an epoch: ``set_epoch``, ``len``, ``epoch_indices(epoch)``,
        iteration, and ``augment(images, generator)`` to run on the device on every batch."""
        kw = dict(seed=seed, num_shards=num_shards, shard_index=shard_index, device=device, drop_last=drop_last)
        if isinstance(self.train, ImageData):
            augment = batch_train_augment(self.train.images.shape[-2:], self.input_size[-2:])
            return InMemoryTrainLoader(self.train, batch_size, augment=augment, **kw)
        return StreamingTrainLoader(self.train, batch_size, workers=self._workers(workers), **kw)

    def eval_loader(self, split: str = "eval", batch_size: int = 256, *, num_shards: int = 1, shard_index: int = 0,
                    device: Union[str, torch.device, None] = None, workers: Optional[int] = None):
        """Batches of every ``num_shards``-th sample of ``split`` ("eval" or "val"), in order: over all
        shards each sample is seen exactly once. Make it once and iterate it every evaluation."""
        if split == "train":
            raise ValueError("eval_loader serves 'eval' or 'val'; use train_loader for the training split")
        part = self._split(split)
        kw = dict(num_shards=num_shards, shard_index=shard_index, device=device)
        if isinstance(part, ImageData):
            return InMemoryEvalLoader(part, batch_size, **kw)
        return StreamingEvalLoader(part, batch_size, workers=self._workers(workers), **kw)

    def _workers(self, workers):
        return self.num_workers if workers is None else workers


# ---------------------------------------------------------------------------------------------
# planning: image size, memory


def default_memory_budget() -> int:
    """A quarter of the RAM available now (``MemAvailable``): decoding briefly holds a split about
    twice over, and the models, optimiser states and workers need the rest."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:  # pragma: no cover - not Linux
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 4 << 30


def _probe_sizes(split: SourceSplit, rows: np.ndarray, seed: int) -> set[tuple[int, int]]:
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, 7])
    probe = rows if len(rows) <= _SIZE_PROBES else rng.choice(rows, _SIZE_PROBES, replace=False)
    return {split.image_size(int(r)) for r in probe}


def _input_size(value) -> Optional[tuple[int, int, int]]:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (3, int(value), int(value))
    value = tuple(value)
    if len(value) == 2:
        value = (3,) + value
    if len(value) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value) \
            or value[0] != 3 or min(value[1:]) < 1:
        raise ValueError(f"input_size must be N, (H, W) or (3, H, W) with positive sizes, got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _resolve_cache(cache_dir, cache: bool) -> Optional[Path]:
    if not cache:
        return None
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _check_options(train_subset, eval_subset, val_size, seed, in_memory, memory_budget, crop_pct, interpolation):
    for what, value in (("train_subset", train_subset), ("eval_subset", eval_subset)):
        if value is not None and _check_count(what, value) < 1:
            raise ValueError(f"{what} must be ≥ 1, got {value}")
    if _check_count("val_size", val_size) < 0:
        raise ValueError(f"val_size must be ≥ 0, got {val_size}")
    _check_count("seed", seed)
    if in_memory not in (None, True, False):
        raise ValueError(f"in_memory must be None (auto), True or False, got {in_memory!r}")
    if memory_budget is not None and _check_count("memory_budget", memory_budget) < 0:
        raise ValueError(f"memory_budget must be ≥ 0 bytes, got {memory_budget}")
    if crop_pct is not None and not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct!r}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {interpolation!r}")


# ---------------------------------------------------------------------------------------------
# the public loaders


def build_data(dataset: str, *, data_dir: Optional[Union[str, os.PathLike]] = None,
               train_subset: Optional[int] = None, eval_subset: Optional[int] = None, val_size: int = 0,
               seed: int = 0, cache_dir: Optional[Union[str, os.PathLike]] = None, cache: bool = True,
               num_workers: Optional[int] = None, in_memory: Optional[bool] = None,
               memory_budget: Optional[int] = None, input_size=None, crop_pct: Optional[float] = None,
               interpolation: str = "bilinear", train_split: Optional[str] = None, val_split: Optional[str] = None,
               image_column: Optional[str] = None, label_column: Optional[str] = None,
               train_options: Optional[dict] = None) -> DataSplits:
    """The train, eval (the source's held-out split) and optional validation split of ``dataset``.

    ``dataset``: ``cifar10``/``cifar100``/``tiny-imagenet`` (hub copy, or ``data_dir`` in its parquet
    layout), ``folder`` (``data_dir``/train/<class>/…), ``parquet`` (a folder of split files) or
    ``hfds/<hub id>``. ``train_split``/``val_split`` name the split folders or file stems (default
    ``train`` and the first of the data set's own, val, validation, valid, test that exists).

    Subsets and the validation split (``val_size`` rows held out of train) are seeded and
    class-balanced, drawn from the labels before any image is decoded. ``input_size`` (default:
    the images' own size, which must then be one size) is what the loaders yield; eval images are
    resized and centre-cropped to it as timm does (``crop_pct``, ``interpolation``).

    ``in_memory``: True decodes every split into uint8 tensors (cached in ``cache_dir`` when at
    least ``MIN_CACHED_ROWS`` rows), False streams them through DataLoader workers, None picks
    the former when the decoded splits fit ``memory_budget`` bytes (default
    :func:`default_memory_budget`). ``num_workers``: decoding processes, and the streaming
    loaders' workers. ``train_options``: keyword arguments of the streaming path's per-image
    training transform (:func:`.transforms.train_transform`: ``auto_augment``, ``color_jitter``,
    ``train_interpolation``).
    """
    _check_options(train_subset, eval_subset, val_size, seed, in_memory, memory_budget, crop_pct, interpolation)
    input_size = _input_size(input_size)
    sized_by_user = input_size is not None
    source = open_source(dataset, data_dir=data_dir, train_split=train_split, val_split=val_split,
                         image_column=image_column, label_column=label_column)
    train_src, eval_src = source.splits["train"], source.splits["eval"]
    num_classes = len(source.classes)
    train_rows, val_rows = split_train_val(train_src.labels, val_size=val_size, train_subset=train_subset,
                                           num_classes=num_classes, seed=seed)
    if eval_subset is None:
        eval_rows = np.arange(len(eval_src.labels))
    else:
        if eval_subset > len(eval_src.labels):
            raise ValueError(f"eval_subset={eval_subset} exceeds the {len(eval_src.labels)} images of split "
                             f"{eval_src.name!r}")
        eval_rows = balanced_subset_indices(eval_src.labels, eval_subset, num_classes=num_classes, seed=seed)

    sizes = _probe_sizes(train_src, train_rows, seed) | _probe_sizes(eval_src, eval_rows, seed)
    native = next(iter(sizes)) if len(sizes) == 1 else None
    if input_size is None:
        if native is None:
            raise ValueError(f"images differ in size ({', '.join(f'{h}×{w}' for h, w in sorted(sizes)[:4])}, …); "
                             f"pass input_size (--input-size / --img-size) to resize them")
        input_size = (3,) + native
    hw = input_size[1:]
    # Training images of mixed sizes are stored as squares a crop margin larger than the input.
    store_side = math.floor(max(hw) / (crop_pct or _DEFAULT_CROP_PCT))
    train_hw = native if native is not None else (store_side, store_side)
    eval_tf = eval_transform(native, hw, crop_pct=crop_pct, interpolation=interpolation)
    identity_eval = crop_pct is None and native == tuple(hw)

    decoded_bytes = 3 * (len(train_rows) * train_hw[0] * train_hw[1] + (len(val_rows) + len(eval_rows)) * hw[0] * hw[1])
    budget = default_memory_budget() if memory_budget is None else memory_budget
    use_memory = decoded_bytes <= budget if in_memory is None else in_memory

    if not use_memory:
        def stream(src, rows):
            return StreamSplit(src, rows, source.classes, eval_transform=eval_tf,
                               train_transform=train_transform(native, hw, interpolation=interpolation,
                                                               **(train_options or {})))
        return DataSplits(train=stream(train_src, train_rows), eval=stream(eval_src, eval_rows),
                          val=stream(train_src, val_rows) if val_size else None, num_classes=num_classes,
                          input_size=input_size, classes=source.classes, num_workers=num_workers)

    kw = dict(cache_dir=_resolve_cache(cache_dir, cache), num_workers=num_workers)
    store_tf = None if native is not None else storage_transform(store_side, interpolation=interpolation)
    try:
        train = decode_split(source.key, train_src, train_rows, source.classes, transform=store_tf, **kw)
    except ValueError as e:
        # The probed headers agreed but the split does not: with an input size to aim for, store
        # the training images as squares like any mixed-size split.
        if "differ in size" not in str(e) or not sized_by_user:
            raise
        train = decode_split(source.key, train_src, train_rows, source.classes,
                             transform=storage_transform(store_side, interpolation=interpolation), **kw)
    ev_tf = None if identity_eval else eval_tf
    val = decode_split(source.key, train_src, val_rows, source.classes, transform=ev_tf, **kw) if val_size else None
    evaluation = decode_split(source.key, eval_src, eval_rows, source.classes, transform=ev_tf, **kw)
    if tuple(evaluation.input_size) != tuple(input_size):
        raise ValueError(f"{eval_src.name!r} images are {evaluation.input_size[1]}×{evaluation.input_size[2]} "
                         f"but the input size is {hw[0]}×{hw[1]}; pass input_size to resize them")
    return DataSplits(train=train, eval=evaluation, val=val, num_classes=num_classes, input_size=input_size,
                      classes=source.classes, num_workers=num_workers)


@dataclass(frozen=True)
class DataInfo:
    """What a source holds, read without decoding: for choosing models and sizes before loading."""
    classes: list[str]
    #: ``(H, W)`` when the probed images share one size, else None (then ``input_size`` is required)
    native_size: Optional[tuple[int, int]]
    train_rows: int
    eval_rows: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def describe_data(dataset: str, *, data_dir: Optional[Union[str, os.PathLike]] = None, seed: int = 0,
                  train_split: Optional[str] = None, val_split: Optional[str] = None,
                  image_column: Optional[str] = None, label_column: Optional[str] = None) -> DataInfo:
    """Open ``dataset`` as :func:`build_data` would (same arguments, same errors) and report its
    classes, image size and split lengths, decoding nothing: a few image headers are read."""
    source = open_source(dataset, data_dir=data_dir, train_split=train_split, val_split=val_split,
                         image_column=image_column, label_column=label_column)
    train_src, eval_src = source.splits["train"], source.splits["eval"]
    sizes = _probe_sizes(train_src, np.arange(len(train_src)), seed) | \
        _probe_sizes(eval_src, np.arange(len(eval_src)), seed)
    return DataInfo(list(source.classes), next(iter(sizes)) if len(sizes) == 1 else None, len(train_src),
                    len(eval_src))


def load_dataset_split(dataset: str, split: str = "train", *, data_dir: Optional[Union[str, os.PathLike]] = None,
                       subset: Optional[int] = None, seed: int = 0,
                       cache_dir: Optional[Union[str, os.PathLike]] = None, cache: bool = True,
                       num_workers: Optional[int] = None) -> ImageData:
    """Decode one split (``"train"`` or ``"eval"``, the latter being test/valid) at its own size,
    optionally a class-balanced subset."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    source: Source = open_source(dataset, data_dir=data_dir, roles=(split,))
    src = source.splits[split]
    rows = np.arange(len(src.labels)) if subset is None else balanced_subset_indices(
        src.labels, subset, num_classes=len(source.classes), seed=seed, _stream=0 if split == "train" else 1)
    return decode_split(source.key, src, rows, source.classes, cache_dir=_resolve_cache(cache_dir, cache),
                        num_workers=num_workers)
