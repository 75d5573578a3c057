"""The batch-level part of timm's training recipe: random erasing, mixup/CutMix and label smoothing.

Runs on the device after the loader's augmentation and before the nodes' normalisation, so
every node sees the same erased and mixed batch; the targets leave as soft labels [B, C]
(what the fused loss op takes), or as the integer labels unchanged when all of it is off.

Mixing is done on pixel values (0…255, float): a convex combination (mixup) and a pasted box
(CutMix) commute with each node's per-channel normalisation, so this equals mixing every
node's normalised input. Random erasing fills with N(0, 1) in normalised space, as timm's
``RandomErasing`` does after its loader normalises: here in the space of the first network's
mean/std (every node's, unless the nodes' pretrained_cfgs differ).
"""
from __future__ import annotations

from typing import Optional

import torch

from .timm_recipe import mixes

__all__ = ["BatchMixing", "build_batch_mixing"]


class BatchMixing:
    """``(images, labels, epoch) -> (images, targets)`` for one training batch."""

    def __init__(self, cfg, num_classes: int, mean: torch.Tensor, std: torch.Tensor):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.num_classes = int(num_classes)
        self.smoothing = float(cfg.smoothing)
        self.off_epoch = int(cfg.mixup_off_epoch)
        self.mean, self.std = mean, std  # [1, 3, 1, 1], pixel units (×255)
        self.mixup = None
        if mixes(cfg):
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                               prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.smoothing, num_classes=self.num_classes)
        self.erasing = None
        if cfg.reprob > 0:
            self.erasing = RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device=str(mean.device))

    def mixing_at(self, epoch: int) -> bool:
        """Whether mixup/CutMix is on in 0-based ``epoch`` (timm's --mixup-off-epoch)."""
        return self.mixup is not None and not (self.off_epoch and epoch >= self.off_epoch)

    def record(self, epoch: int) -> dict:
        """What the epoch's targets were, for metrics.jsonl."""
        return {"mixup": self.mixing_at(epoch), "smoothing": self.smoothing,
                "reprob": 0.0 if self.erasing is None else self.erasing.probability}

    def _soft(self, labels: torch.Tensor) -> torch.Tensor:
        from timm.data.mixup import mixup_target
        return mixup_target(labels, self.num_classes, smoothing=self.smoothing)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int):
        if self.erasing is None and self.mixup is None:
            return images, (self._soft(labels) if self.smoothing > 0 else labels)
        x = images.float()  # a copy of the uint8 batch: timm's Mixup and RandomErasing work in place
        if self.erasing is not None:
            x = self.erasing((x - self.mean) / self.std) * self.std + self.mean
        if self.mixup is None:
            return x, (self._soft(labels) if self.smoothing > 0 else labels)
        self.mixup.mixup_enabled = self.mixing_at(epoch)
        if x.shape[0] % 2 == 0:
            return self.mixup(x, labels)
        # timm's Mixup pairs sample i with sample B-1-i and refuses an odd batch (an epoch's last
        # partial batch): the odd sample out keeps its image and gets its smoothed label.
        head, target = self.mixup(x[:-1].contiguous(), labels[:-1])
        return torch.cat([head, x[-1:]]), torch.cat([target, self._soft(labels[-1:]).to(target.dtype)])


def build_batch_mixing(cfg, num_classes: int, mean: torch.Tensor, std: torch.Tensor) -> Optional[BatchMixing]:
    """The batch transform of ``cfg``, or None when mixing, smoothing and erasing are all off."""
    if not (mixes(cfg) or cfg.smoothing > 0 or cfg.reprob > 0):
        return None
    return BatchMixing(cfg, num_classes, mean, std)
