"""Image data for timm-dcl.

Modules, one job each: :mod:`.sources` (where images come from), :mod:`.splits` (seeded,
class-balanced subsets), :mod:`.memory` (the in-memory path: decode once, keep uint8, slice
batches), :mod:`.augment` (batched augmentation on the device), :mod:`.normalize` (per-node
normalisation) and :mod:`.build` (``build_data``). ``datasets`` is imported only when data is
loaded, so ``import timm_dcl`` stays light.
"""
from .augment import (GPUAugment, apply_crop_flip, augment_batch, default_padding, per_sample_train_transform,
                      sample_augment_params)
from .build import DataSplits, build_data, load_dataset_split
from .memory import (MIN_CACHED_ROWS, BatchLoader, ImageData, ImageTensorDataset, decode_images, default_cache_dir,
                     make_torch_dataset)
from .normalize import Normalize, normalize
from .sources import DATASETS, DatasetUnavailableError
from .splits import balanced_subset_indices, split_train_val

__all__ = [
    "DATASETS", "ImageData", "DataSplits", "DatasetUnavailableError",
    "build_data", "load_dataset_split", "balanced_subset_indices", "split_train_val",
    "decode_images", "default_cache_dir",
    "default_padding", "sample_augment_params", "apply_crop_flip", "augment_batch", "GPUAugment",
    "normalize", "Normalize", "BatchLoader",
    "ImageTensorDataset", "make_torch_dataset", "per_sample_train_transform",
]
