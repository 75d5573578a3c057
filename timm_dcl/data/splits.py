"""Seeded, class-balanced subsets and train/validation splits, drawn from the labels alone
(before any image is decoded), and the per-epoch order of a split sharded over ranks."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["balanced_subset_indices", "split_train_val", "shard_positions", "check_sharding"]


def _check_count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    return int(n)


def _balanced_counts(available: np.ndarray, n: int) -> np.ndarray:
    """Per-class counts summing to ``n``: as even as ``available`` allows, extras to low class ids."""
    counts = np.zeros_like(available)
    remaining = n
    while remaining > 0:
        open_ = np.flatnonzero(counts < available)
        share, extra = divmod(remaining, len(open_))
        give = np.full(len(open_), share, dtype=available.dtype)
        give[:extra] += 1
        give = np.minimum(give, available[open_] - counts[open_])
        counts[open_] += give
        remaining -= int(give.sum())
    return counts


def _class_permutations(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]
    return [rng.permutation(rows) for rows in np.split(order, bounds)]


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Separate streams so the eval subset does not move when the train selection changes.
    return np.random.default_rng([_check_count("seed", seed) & 0xFFFFFFFFFFFFFFFF, stream])


def balanced_subset_indices(labels, n: int, *, num_classes: Optional[int] = None, seed: int = 0,
                            _stream: int = 1) -> np.ndarray:
    """Sorted row indices of a seeded, class-balanced subset of ``n`` rows.

    Each class gets ``n // C`` rows, the remainder going one each to the lowest class ids; a class
    with too few rows gives its shortfall to the others.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = _check_count("subset size", n)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if n < 1:
        raise ValueError(f"subset size must be ≥ 1, got {n}")
    if n > len(labels):
        raise ValueError(f"subset of {n} requested but only {len(labels)} images are available")
    perms = _class_permutations(labels, num_classes, _rng(seed, _stream))
    counts = _balanced_counts(np.array([len(p) for p in perms]), n)
    return np.sort(np.concatenate([p[:k] for p, k in zip(perms, counts)]))


def split_train_val(labels, *, val_size: int = 0, train_subset: Optional[int] = None,
                    num_classes: Optional[int] = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-balanced ``(train_rows, val_rows)`` of one training split, disjoint.

    ``val_size`` rows are held out first; the train rows (all the rest, or a balanced
    ``train_subset`` of them) come from what remains.
    """
    labels = np.asarray(labels, dtype=np.int64)
    val_size = _check_count("val_size", val_size)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    total = len(labels)
    if val_size < 0:
        raise ValueError(f"val_size must be ≥ 0, got {val_size}")
    if val_size >= total:
        raise ValueError(f"val_size={val_size} leaves no training images (the split has {total})")
    perms = _class_permutations(labels, num_classes, _rng(seed, 0))
    available = np.array([len(p) for p in perms])
    val_counts = _balanced_counts(available, val_size)
    rest = available - val_counts
    if train_subset is None:
        train_counts = rest
    else:
        train_subset = _check_count("train_subset", train_subset)
        if train_subset < 1:
            raise ValueError(f"train_subset must be ≥ 1, got {train_subset}")
        if train_subset > int(rest.sum()):
            held = f" after holding out val_size={val_size}" if val_size else ""
            raise ValueError(f"train_subset={train_subset} exceeds the {int(rest.sum())} training images "
                             f"available{held}")
        train_counts = _balanced_counts(rest, train_subset)
    val = np.concatenate([p[:v] for p, v in zip(perms, val_counts)])
    train = np.concatenate([p[v:v + t] for p, v, t in zip(perms, val_counts, train_counts)])
    return np.sort(train), np.sort(val)



# ---------------------------------------------------------------------------------------------
# sharding an epoch over ranks


def check_sharding(n: int, batch_size: int, num_shards: int, shard_index: int) -> None:
    batch_size = _check_count("batch_size", batch_size)
    num_shards, shard_index = _check_count("num_shards", num_shards), _check_count("shard_index", shard_index)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need num_shards ≥ 1 and 0 ≤ shard_index < num_shards, got {shard_index}/{num_shards}")
    if n < num_shards:
        raise ValueError(f"{n} images cannot be split over {num_shards} shards")


def shard_positions(n: int, *, seed: int, epoch: int, num_shards: int = 1, shard_index: int = 0,
                    shuffle: bool = True) -> torch.Tensor:
    """This shard's positions for ``epoch``: a permutation seeded by ``seed + epoch`` (the same on
    every rank), cut into ``num_shards`` contiguous equal slices; the last ``n % num_shards``
    positions sit the epoch out so every rank runs the same number of steps."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    per_shard = n // num_shards
    return order[shard_index * per_shard:(shard_index + 1) * per_shard]
