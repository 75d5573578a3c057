"""Augmentation: the paper's reflect-pad crop and flip for whole batches on the device, and its
per-sample torchvision counterpart."""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["default_padding", "sample_augment_params", "apply_crop_flip", "augment_batch", "GPUAugment",
           "per_sample_train_transform"]


def default_padding(height: int, width: Optional[int] = None) -> int:
    """Crop padding for an image size: 4 for 32×32 (the paper), an eighth of the side in general."""
    return min(height, height if width is None else width) // 8


def sample_augment_params(n: int, *, padding: int, flip: bool = True,
                          generator: Optional[torch.Generator] = None,
                          device: Union[str, torch.device, None] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets ``[n, 2]`` (row, col) in ``[0, 2·padding]`` and flip flags ``[n]``.

    Offsets are drawn first, then flips, from ``generator`` (which must live on ``device``).
    """
    device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {device}")
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    else:
        offsets = torch.zeros(n, 2, dtype=torch.long, device=device)
    if flip:
        flips = torch.rand(n, generator=generator, device=device) < 0.5
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=device)
    return offsets, flips


def _reflect(coords: torch.Tensor, size: int) -> torch.Tensor:
    # Index into the reflect-padded image without building it: -1 → 1, size → size-2 (no edge repeat).
    coords = coords.abs()
    return torch.where(coords >= size, 2 * (size - 1) - coords, coords)


def apply_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, *, padding: int) -> torch.Tensor:
    """Crop each image out of its reflect-padded version at ``offsets``, then mirror where ``flips``.

    One gather for the whole batch; works for any dtype and device.
    """
    if images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    n, c, h, w = images.shape
    if tuple(offsets.shape) != (n, 2) or tuple(flips.shape) != (n,):
        raise ValueError(f"need offsets [{n}, 2] and flips [{n}], got {tuple(offsets.shape)} and {tuple(flips.shape)}")
    dev = images.device
    top = offsets[:, 0:1].to(dev) - padding
    left = offsets[:, 1:2].to(dev) - padding
    rows = _reflect(torch.arange(h, device=dev)[None] + top, h)              # [n, h]
    cols = _reflect(torch.arange(w, device=dev)[None] + left, w)             # [n, w]
    cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def augment_batch(images: torch.Tensor, *, padding: Optional[int] = None, flip: bool = True,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Reflect-pad, random-crop back to H×W and randomly h-flip every image of a batch ``[N, C, H, W]``.

    Same dtype out as in (uint8 stays uint8). Randomness comes from ``generator`` only (on the
    images' device), so seeding it reproduces an epoch bit for bit.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    n, _, h, w = images.shape
    padding = default_padding(h, w) if padding is None else int(padding)
    if padding < 0 or padding >= min(h, w):
        raise ValueError(f"padding must lie in [0, {min(h, w) - 1}] for {h}×{w} images, got {padding}")
    offsets, flips = sample_augment_params(n, padding=padding, flip=flip, generator=generator, device=images.device)
    return apply_crop_flip(images, offsets, flips, padding=padding)


class GPUAugment:
    """The paper's augmentation (reflect-pad, random crop, h-flip) for whole batches on any device."""

    def __init__(self, padding: Optional[int] = None, flip: bool = True):
        if padding is not None and padding < 0:
            raise ValueError(f"padding must be ≥ 0, got {padding}")
        self.padding = padding
        self.flip = flip

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return augment_batch(images, padding=self.padding, flip=self.flip, generator=generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, flip={self.flip})"



def per_sample_train_transform(size: Union[int, tuple[int, int]] = 32, *, padding: Optional[int] = None,
                               flip: bool = True, mean=None, std=None):
    """torchvision (v2) version of the same augmentation, applied one image at a time."""
    from torchvision.transforms import v2
    h, w = (size, size) if isinstance(size, int) else size
    ops = [v2.RandomCrop((h, w), padding=default_padding(h, w) if padding is None else padding,
                         padding_mode="reflect")]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None and std is not None:
        ops.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(ops)

