"""Per-image transforms (PIL in, uint8 CHW tensor out, not normalised) for the streaming path and
for resizing while decoding into memory.

timm's ``create_transform(..., use_prefetcher=True)`` gives the training crop (random-resized-crop,
flip) and the eval resize + centre crop (``crop_pct``), ending in a uint8 tensor that timm's
``fast_collate`` batches; each node normalises on the device with its own mean/std. timm has no
reflect-pad crop (the paper's CIFAR augmentation), so for images trained at their own small size
that one crop is torchvision's ``RandomCrop(padding_mode="reflect")``, followed by the same flip.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .augment import default_padding, uses_pad_crop

__all__ = ["train_transform", "eval_transform", "storage_transform"]


def _to_uint8_tensor():
    from timm.data.transforms import MaybePILToTensor
    return MaybePILToTensor()


def train_transform(native_hw: Optional[Sequence[int]], input_size: Sequence[int], *,
                    interpolation: str = "bilinear"):
    """The per-image training transform: reflect-pad crop + flip when the images are trained at
    their own small size (see :func:`.augment.uses_pad_crop`), else timm's random-resized-crop + flip."""
    from torchvision import transforms
    h, w = input_size[-2:]
    if native_hw is not None and uses_pad_crop(native_hw, (h, w)):
        return transforms.Compose([
            # pad_if_needed: an image smaller than the sampled ones must not stop an epoch
            transforms.RandomCrop((h, w), padding=default_padding(h, w), pad_if_needed=True, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            _to_uint8_tensor(),
        ])
    from timm.data import create_transform
    # color_jitter=None: the same augmentation as the in-memory path's batched crop and flip.
    return create_transform((3, h, w), is_training=True, use_prefetcher=True, color_jitter=None,
                            interpolation=interpolation)


def eval_transform(native_hw: Optional[Sequence[int]], input_size: Sequence[int], *,
                   crop_pct: Optional[float] = None, interpolation: str = "bilinear"):
    """Images already at the input size pass unchanged (the paper evaluates CIFAR as stored) unless
    ``crop_pct`` is given; otherwise timm's eval transform: resize to ``input / crop_pct`` and
    centre-crop the input size."""
    from torchvision import transforms
    h, w = input_size[-2:]
    if crop_pct is None and native_hw is not None and tuple(native_hw) == (h, w):
        # CenterCrop is the identity on images of the input size, and keeps a stray other size
        # from breaking the batch.
        return transforms.Compose([transforms.CenterCrop((h, w)), _to_uint8_tensor()])
    from timm.data import create_transform
    return create_transform((3, h, w), is_training=False, use_prefetcher=True, crop_pct=crop_pct,
                            interpolation=interpolation)


def storage_transform(side: int, *, interpolation: str = "bilinear"):
    """For training images of mixed sizes kept in memory: shorter side resized to ``side``, centre
    square kept, so the batched random-resized-crop can draw from one tensor."""
    from timm.data import create_transform
    return create_transform((3, side, side), is_training=False, use_prefetcher=True, crop_pct=1.0,
                            interpolation=interpolation)
