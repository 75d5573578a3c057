"""The streaming path: a torch ``DataLoader`` whose workers open, decode and transform one image at
a time (timm's per-image transforms, timm's ``fast_collate``), so no decoded split is ever held in
memory. Batches leave as uint8 ``[B, 3, H, W]`` at the input size, not normalised.

Reproducibility: the augmentation of a sample is drawn from RNGs seeded by ``(seed, epoch, row)``
just for that sample, rather than by the usual per-worker seed (a ``worker_init_fn``). Which
worker decodes which sample then does not matter: an epoch's crops are the same with 0, 2 or 8
workers, on one rank or eight, and a resumed run replays them.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .memory import _default_workers
from .sources import SourceSplit
from .splits import _check_count, check_sharding, shard_positions

__all__ = ["StreamSplit", "StreamingDataset", "StreamingTrainLoader", "StreamingEvalLoader"]


class StreamSplit:
    """Rows of a source split kept encoded, with the transforms that turn one into a training or
    an evaluation image. Mirrors :class:`.memory.ImageData` minus ``images``."""

    def __init__(self, source: SourceSplit, rows: np.ndarray, classes: list[str], *, train_transform=None,
                 eval_transform=None):
        if len(rows) == 0:
            raise ValueError(f"split {source.name!r} selects no images")
        self.source, self.rows, self.classes = source, np.asarray(rows, dtype=np.int64), list(classes)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.labels = torch.from_numpy(source.labels[self.rows].copy())
        self.indices = torch.from_numpy(self.rows.copy())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.rows)

    def dataset(self, train: bool, seed: int = 0) -> "StreamingDataset":
        return StreamingDataset(self.source, self.rows, self.labels.numpy(),
                                self.train_transform if train else self.eval_transform, seed)


@contextmanager
def _seeded(seed: int, epoch: int, row: int):
    # timm's crops draw from Python's `random`, torchvision's from torch's CPU generator. Both are
    # restored afterwards: with num_workers=0 this runs in the training process, whose dropout
    # must not notice. CUDA generators are untouched (devices=[]).
    words = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, row]).generate_state(2)
    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed((int(words[0]) << 32) | int(words[1]))
        random.seed(int(words[0]))
        np.random.seed(int(words[1]))  # timm's RandAugment picks its ops with numpy's
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


class StreamingDataset(Dataset):
    """``(uint8 CHW image, label)`` for position ``i``, or for ``(i, epoch)`` with seeded augmentation."""

    def __init__(self, source: SourceSplit, rows: np.ndarray, labels: np.ndarray, transform, seed: int = 0):
        self.source, self.rows, self.labels, self.transform, self.seed = source, rows, labels, transform, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        pos, epoch = key if isinstance(key, tuple) else (key, None)
        row = int(self.rows[pos])
        image = self.source.open_image(row)
        if self.transform is not None:
            if epoch is None:
                image = self.transform(image)
            else:
                with _seeded(self.seed, epoch, row):
                    image = self.transform(image)
        return image, int(self.labels[pos])


class _EpochOrder:
    """The shard's order for the current epoch. Shared by the loader and its sampler; the sampler
    must not hold the loader itself: that cycle leaves the DataLoader's workers to the garbage
    collector, whose finalisers then wait seconds for each of them."""

    def __init__(self, n: int, seed: int, num_shards: int, shard_index: int):
        self.n, self.seed, self.num_shards, self.shard_index = n, seed, num_shards, shard_index
        self.per_shard = n // num_shards
        self.epoch = 0
        self.start = 0  # the next epoch's first position (a resume mid-epoch); read once

    def positions(self, epoch: Optional[int] = None) -> torch.Tensor:
        return shard_positions(self.n, seed=self.seed, epoch=self.epoch if epoch is None else epoch,
                               num_shards=self.num_shards, shard_index=self.shard_index)


class _EpochSampler(Sampler):
    """Yields ``(position, epoch)`` for the current epoch. It runs in the main process, so one
    persistent ``DataLoader`` serves every epoch."""

    def __init__(self, order: _EpochOrder):
        self.order = order

    def __len__(self) -> int:
        return self.order.per_shard

    def __iter__(self):
        epoch, start = self.order.epoch, self.order.start
        self.order.start = 0
        return iter([(int(p), epoch) for p in self.order.positions(epoch)[start:]])


def _data_loader(dataset, batch_size, sampler, workers, device, drop_last=False) -> DataLoader:
    from timm.data.loader import fast_collate
    workers = _default_workers() if workers is None else _check_count("workers", workers)
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=fast_collate, pin_memory=pin, drop_last=drop_last,
                      persistent_workers=workers > 0)


def _to(batch, device):
    images, labels = batch
    if device is None:
        return images, labels
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class StreamingTrainLoader:
    """The streaming path's training loader: the same epoch order and shards as the in-memory
    :class:`.memory.BatchLoader`, the images cropped and flipped per sample by the workers
    (``augment`` is therefore the identity)."""

    def __init__(self, split: StreamSplit, batch_size: int, *, seed: int, num_shards: int = 1, shard_index: int = 0,
                 device: Union[str, torch.device, None] = None, drop_last: bool = False,
                 workers: Optional[int] = None):
        check_sharding(len(split), batch_size, num_shards, shard_index)
        self.split, self.batch_size, self.drop_last, self.device = split, int(batch_size), drop_last, device
        self.seed = _check_count("seed", seed)
        self._order = _EpochOrder(len(split), self.seed, int(num_shards), int(shard_index))
        self.per_shard = self._order.per_shard
        self._loader = _data_loader(split.dataset(train=True, seed=self.seed), self.batch_size,
                                    _EpochSampler(self._order), workers, device, drop_last)

    @property
    def epoch(self) -> int:
        return self._order.epoch

    def set_epoch(self, epoch: int) -> None:
        self._order.epoch = _check_count("epoch", epoch)

    def epoch_positions(self, epoch: Optional[int] = None) -> torch.Tensor:
        return self._order.positions(epoch)

    def epoch_indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """The source rows this shard sees in ``epoch``, in order."""
        return self.split.indices[self.epoch_positions(epoch)]

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_shard // self.batch_size
        return math.ceil(self.per_shard / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._loader:
            yield _to(batch, self.device)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch ``start`` on, the skipped images not even read."""
        self._order.start = int(start) * self.batch_size
        return iter(self)

    def augment(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return images


class StreamingEvalLoader:
    """Every ``num_shards``-th sample from ``shard_index`` on, in order, through the eval transform."""

    def __init__(self, split: StreamSplit, batch_size: int = 256, *, num_shards: int = 1, shard_index: int = 0,
                 device: Union[str, torch.device, None] = None, workers: Optional[int] = None):
        check_sharding(len(split), batch_size, num_shards, shard_index)
        self.device = device
        positions = list(range(shard_index, len(split), num_shards))
        self._loader = _data_loader(split.dataset(train=False), int(batch_size), positions, workers, device)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._loader:
            yield _to(batch, self.device)
