"""Gradient accumulation (``--grad-accum-steps N``): N batches per optimiser update.

Built on Accelerate's ``no_sync`` (DDP all-reduces only the last batch of a group) and its
``backward``. The group boundaries are set here rather than by ``Accelerator.accumulate``,
which ends an epoch's last, short group only for a DataLoader it prepared itself; the
trainer's loaders are its own (seeded shards, device augmentation). So every epoch has
ceil(batches / N) updates, each the mean gradient of its group's batches (a short last group
is divided by its own size), and the lr schedule and the linear gates' k/K count updates.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

__all__ = ["Accumulation"]


class Accumulation:
    def __init__(self, steps: int, batches_per_epoch: int):
        if int(steps) < 1:
            raise ValueError(f"--grad-accum-steps must be ≥ 1, got {steps}")
        self.steps, self.batches = int(steps), int(batches_per_epoch)

    @property
    def updates_per_epoch(self) -> int:
        return math.ceil(self.batches / self.steps)

    def starts_update(self, step: int) -> bool:
        """Batch ``step`` (0-based within the epoch) is the first of its group."""
        return step % self.steps == 0

    def ends_update(self, step: int) -> bool:
        """Batch ``step`` is the last of its group: the optimiser steps after it."""
        return (step + 1) % self.steps == 0 or step + 1 == self.batches

    def loss_scale(self, step: int) -> float:
        """1 / the size of ``step``'s group: the update is the mean over the group's batches."""
        start = step - step % self.steps
        return 1.0 / min(self.steps, self.batches - start)

    def context(self, accelerator, models: Iterable, step: int):
        """No gradient all-reduce inside a group, only on its last batch."""
        if self.steps == 1 or self.ends_update(step):
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
        return stack
