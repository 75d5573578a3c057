"""build_data / load_dataset_split: open a source, draw the subsets, feed the trainer."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .memory import ImageData, _decode_split, default_cache_dir
from .sources import _classes_and_count, _columns, _labels, _open, _spec
from .splits import _check_count, balanced_subset_indices, split_train_val

__all__ = ["DataSplits", "build_data", "load_dataset_split"]


@dataclass
class DataSplits:
    """Train, evaluation (the hub's test/valid split) and optional validation (held out of train)."""
    train: ImageData
    eval: ImageData
    val: Optional[ImageData]
    num_classes: int
    input_size: tuple[int, int, int]


def _resolve_cache(cache_dir, cache: bool) -> Optional[Path]:
    if not cache:
        return None
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def build_data(dataset: str, *, data_dir: Optional[Union[str, os.PathLike]] = None,
               train_subset: Optional[int] = None, eval_subset: Optional[int] = None, val_size: int = 0,
               seed: int = 0, cache_dir: Optional[Union[str, os.PathLike]] = None, cache: bool = True,
               num_workers: Optional[int] = None) -> DataSplits:
    """Load and decode the train, eval (test/valid) and optional validation split of ``dataset``.

    ``data_dir`` is an offline folder in the hub's parquet layout; without it the hub copy is
    loaded through ``datasets``. Subsets and the validation split are seeded and class-balanced,
    and are drawn from the labels before any image is decoded. Decoded splits of at least
    ``MIN_CACHED_ROWS`` images are cached in ``cache_dir`` (default :func:`default_cache_dir`).
    """
    name, spec = _spec(dataset)
    for what, value in (("train_subset", train_subset), ("eval_subset", eval_subset)):
        if value is not None and _check_count(what, value) < 1:
            raise ValueError(f"{what} must be ≥ 1, got {value}")
    if _check_count("val_size", val_size) < 0:
        raise ValueError(f"val_size must be ≥ 0, got {val_size}")
    _check_count("seed", seed)
    source = _open(name, spec, data_dir, ("train", "eval"))
    train_split, eval_split = source["train"], source["eval"]
    image_col, label_col = _columns(train_split, spec)
    if _columns(eval_split, spec) != (image_col, label_col):
        raise ValueError(f"splits {train_split.name!r} and {eval_split.name!r} use different columns")
    train_labels, eval_labels = _labels(train_split, label_col), _labels(eval_split, label_col)
    classes = _classes_and_count((train_split, eval_split), label_col, (train_labels, eval_labels))
    num_classes = len(classes)

    train_rows, val_rows = split_train_val(train_labels, val_size=val_size, train_subset=train_subset,
                                           num_classes=num_classes, seed=seed)
    if eval_subset is None:
        eval_rows = np.arange(len(eval_labels))
    else:
        if eval_subset > len(eval_labels):
            raise ValueError(f"eval_subset={eval_subset} exceeds the {len(eval_labels)} images of split "
                             f"{eval_split.name!r}")
        eval_rows = balanced_subset_indices(eval_labels, eval_subset, num_classes=num_classes, seed=seed)

    cache_path = _resolve_cache(cache_dir, cache)
    kw = dict(cache_dir=cache_path, num_workers=num_workers)
    train = _decode_split(name, train_split, image_col, train_rows, train_labels, classes, **kw)
    val = _decode_split(name, train_split, image_col, val_rows, train_labels, classes, **kw) if val_size else None
    evaluation = _decode_split(name, eval_split, image_col, eval_rows, eval_labels, classes, **kw)
    if evaluation.input_size != train.input_size:
        raise ValueError(f"train images are {train.input_size} but {eval_split.name!r} images are "
                         f"{evaluation.input_size}")
    return DataSplits(train=train, eval=evaluation, val=val, num_classes=num_classes, input_size=train.input_size)


def load_dataset_split(dataset: str, split: str = "train", *, data_dir: Optional[Union[str, os.PathLike]] = None,
                       subset: Optional[int] = None, seed: int = 0,
                       cache_dir: Optional[Union[str, os.PathLike]] = None, cache: bool = True,
                       num_workers: Optional[int] = None) -> ImageData:
    """Decode one split (``"train"`` or ``"eval"``, the latter being test/valid), optionally a subset."""
    name, spec = _spec(dataset)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    src = _open(name, spec, data_dir, (split,))[split]
    image_col, label_col = _columns(src, spec)
    labels = _labels(src, label_col)
    classes = _classes_and_count((src,), label_col, (labels,))
    rows = np.arange(len(labels)) if subset is None else balanced_subset_indices(
        labels, subset, num_classes=len(classes), seed=seed, _stream=0 if split == "train" else 1)
    return _decode_split(name, src, image_col, rows, labels, classes,
                         cache_dir=_resolve_cache(cache_dir, cache), num_workers=num_workers)

