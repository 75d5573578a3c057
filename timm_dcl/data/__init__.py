"""Image data for timm-dcl.

Modules, one job each: :mod:`.sources` (where images come from: named data sets, parquet, hub)
and :mod:`.folder` (image folders, through timm's reader), :mod:`.splits` (seeded, class-balanced
subsets; epoch order and shards), :mod:`.memory` (the in-memory path: decode once, keep uint8,
slice batches), :mod:`.streaming` (the streaming path: DataLoader workers, per-image transforms),
:mod:`.augment` (batched augmentation on the device), :mod:`.transforms` (timm's per-image
transforms), :mod:`.normalize` (per-node normalisation) and :mod:`.build` (``build_data``, which
picks the path and gives the trainer one interface for both). ``datasets`` is imported only when data is
loaded, so ``import timm_dcl`` stays light.
"""
from .augment import (GPUAugment, RandomResizedCropFlip, apply_crop_flip, augment_batch, batch_train_augment,
                      default_padding, per_sample_train_transform, resized_crop_flip, sample_augment_params,
                      sample_rrc_boxes)
from .build import DataInfo, DataSplits, build_data, default_memory_budget, describe_data, load_dataset_split
from .memory import (MIN_CACHED_ROWS, BatchLoader, ImageData, ImageTensorDataset, InMemoryEvalLoader,
                     InMemoryTrainLoader, decode_images, default_cache_dir, make_torch_dataset)
from .normalize import Normalize, normalize
from .sources import DATASETS, DatasetUnavailableError, open_source
from .splits import balanced_subset_indices, shard_positions, split_train_val
from .streaming import StreamingEvalLoader, StreamingTrainLoader, StreamSplit

__all__ = [
    "DATASETS", "ImageData", "DataSplits", "DatasetUnavailableError",
    "build_data", "load_dataset_split", "balanced_subset_indices", "split_train_val",
    "decode_images", "default_cache_dir", "MIN_CACHED_ROWS",
    "default_padding", "sample_augment_params", "apply_crop_flip", "augment_batch", "GPUAugment",
    "normalize", "Normalize", "BatchLoader",
    "ImageTensorDataset", "make_torch_dataset", "per_sample_train_transform",
    "DataInfo", "describe_data", "default_memory_budget", "open_source", "shard_positions", "sample_rrc_boxes", "resized_crop_flip",
    "RandomResizedCropFlip", "batch_train_augment", "InMemoryTrainLoader", "InMemoryEvalLoader",
    "StreamSplit", "StreamingTrainLoader", "StreamingEvalLoader",
]
