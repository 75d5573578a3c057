"""Per-node normalisation of uint8 batches."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["normalize", "Normalize"]


def _stats(values, channels: int, name: str, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=dtype, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values but the images have {channels} channels")
    return t.view(1, channels, 1, 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Float ``(x − mean) / std`` per channel; uint8 input is scaled to [0, 1] first."""
    if images.dim() not in (3, 4):
        raise ValueError("images must be [C, H, W] or [N, C, H, W]")
    x = images.float().div_(255) if images.dtype == torch.uint8 else images
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    c = x.shape[-3]
    m = _stats(mean, c, "mean", x.device, x.dtype)
    s = _stats(std, c, "std", x.device, x.dtype)
    if bool((s <= 0).any()):
        raise ValueError("std must be > 0")
    if x.dim() == 3:
        m, s = m[0], s[0]
    return (x - m) / s


class Normalize(nn.Module):
    """``normalize`` as a module, to prepend to a node that has its own mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ValueError("std must be > 0")
        # Not persistent: fixed by the model's config, so checkpoints stay plain model weights.
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"Normalize has {self.mean.shape[1]} channels, input has {x.shape[1]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"

