"""Augmentation of whole uint8 batches on the device: the paper's reflect-pad crop and flip, and
timm's random-resized-crop and flip; and the per-sample torchvision counterpart of the former."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ["default_padding", "sample_augment_params", "apply_crop_flip", "augment_batch", "GPUAugment",
           "per_sample_train_transform", "sample_rrc_boxes", "resized_crop_flip", "RandomResizedCropFlip",
           "batch_train_augment", "uses_pad_crop"]


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



# ---------------------------------------------------------------------------------------------
# batched random-resized-crop (stored size ≠ input size)

#: The paper's reflect-pad crop serves images trained at their own small size (CIFAR 32 px,
#: Tiny-ImageNet 64 px); anything resized, or larger, gets timm's random-resized-crop.
PAD_CROP_MAX_SIDE = 64


def uses_pad_crop(stored_hw: Sequence[int], input_hw: Sequence[int]) -> bool:
    """Whether training crops are reflect-pad crops (True) or random-resized crops (False)."""
    return tuple(stored_hw) == tuple(input_hw) and max(input_hw) <= PAD_CROP_MAX_SIDE


def sample_rrc_boxes(n: int, height: int, width: int, *, scale: Sequence[float] = (0.08, 1.0),
                     ratio: Sequence[float] = (3 / 4, 4 / 3), generator: Optional[torch.Generator] = None,
                     device: Union[str, torch.device, None] = None, attempts: int = 10) -> torch.Tensor:
    """Crop boxes ``[n, 4]`` (top, left, h, w) drawn as torchvision's ``RandomResizedCrop`` draws
    them (area share in ``scale``, log-uniform aspect in ``ratio``, ``attempts`` tries, then the
    centre crop with the aspect clamped to ``ratio``), for a whole batch at once."""
    device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=generator, device=device))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
        n, attempts, generator=generator, device=device)
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros_like(ok[:, 0], dtype=torch.long))
    w = w.gather(1, first[:, None])[:, 0]
    h = h.gather(1, first[:, None])[:, 0]
    # Fallback (no attempt fitted): the whole image, its aspect clamped into ``ratio``.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    fitted = ok.any(1)
    w = torch.where(fitted, w, torch.full_like(w, fw))
    h = torch.where(fitted, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, generator=generator, device=device)
    top = torch.where(fitted, (u[:, 0] * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(fitted, (u[:, 1] * (width - w + 1)).floor().long(), (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                      size: Sequence[int]) -> torch.Tensor:
    """Crop ``boxes`` (top, left, h, w) out of each image, resize to ``size`` (h, w), mirror where
    ``flips``. uint8 in, uint8 out.

    torchvision's ``roi_align`` does the crop-and-resize of the whole batch in one kernel; its
    adaptive sampling averages several points per output pixel when shrinking, which stands in
    for the antialiasing of PIL's resize in timm's per-image transform.
    """
    from torchvision.ops import roi_align
    n = images.shape[0]
    b = boxes.to(images.device, torch.float32)
    rois = torch.stack([torch.arange(n, device=images.device, dtype=torch.float32),
                        b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], 1)
    out = roi_align(images.float(), rois, output_size=tuple(size), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)
    out = torch.where(flips.to(images.device)[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(images.dtype)


class RandomResizedCropFlip:
    """timm's training crop (random-resized-crop to ``size``, h-flip) for whole uint8 batches on any device."""

    def __init__(self, size: Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.ratio, self.flip = tuple(int(s) for s in size), tuple(scale), tuple(ratio), flip

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a tensor [N, C, H, W]")
        n, _, h, w = images.shape
        boxes = sample_rrc_boxes(n, h, w, scale=self.scale, ratio=self.ratio, generator=generator,
                                 device=images.device)
        if self.flip:
            flips = torch.rand(n, generator=generator, device=images.device) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool, device=images.device)
        return resized_crop_flip(images, boxes, flips, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


def batch_train_augment(stored_hw: Sequence[int], input_hw: Sequence[int]):
    """The in-memory path's training augmentation: ``GPUAugment`` (reflect-pad crop, flip) when the
    images are stored at a small input size, else ``RandomResizedCropFlip`` to the input size."""
    if uses_pad_crop(stored_hw, input_hw):
        return GPUAugment()
    return RandomResizedCropFlip(input_hw)
