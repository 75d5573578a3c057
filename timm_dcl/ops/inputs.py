"""Argument checking shared by the fused op and its reference.

Both paths raise the same Python exceptions for the same bad input, so the tests can
hold them to one contract and users see an error that names the problem.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from ..gates import GatesLike, encode_gates

__all__ = ["LogitsLike", "FLOAT_DTYPES", "as_logits", "check_labels", "check_scalars", "result_dtype"]

LogitsLike = Union[torch.Tensor, Sequence[torch.Tensor]]
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_logits(logits: LogitsLike) -> torch.Tensor:
    """Return the logits as one [M, B, C] tensor (stacking a list of M [B, C] tensors)."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(
                f"logits must be a tensor [M, B, C] or a sequence of M tensors [B, C]; "
                f"got a tensor of shape {tuple(logits.shape)}")
        z = logits
    else:
        if isinstance(logits, (str, bytes)) or not isinstance(logits, Sequence) or len(logits) == 0:
            raise TypeError("logits must be a tensor [M, B, C] or a non-empty sequence of M tensors [B, C]")
        for n, zn in enumerate(logits):
            if not isinstance(zn, torch.Tensor):
                raise TypeError(f"logits[{n}] is a {type(zn).__name__}, expected a tensor [B, C]")
            if zn.dim() != 2:
                raise ValueError(f"logits[{n}] must be [B, C], got shape {tuple(zn.shape)}")
            if zn.shape != logits[0].shape:
                what = "batch sizes" if zn.shape[0] != logits[0].shape[0] else "class counts"
                raise ValueError(
                    f"{what} differ: logits[0] is {tuple(logits[0].shape)} but logits[{n}] is {tuple(zn.shape)}")
            if zn.device != logits[0].device:
                raise ValueError(f"logits[{n}] is on {zn.device} but logits[0] is on {logits[0].device}")
            if zn.dtype != logits[0].dtype:
                raise TypeError(f"logits[{n}] is {zn.dtype} but logits[0] is {logits[0].dtype}; use one dtype")
        z = torch.stack(list(logits))
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {z.dtype}")
    if z.shape[1] == 0:
        raise ValueError("logits have an empty batch (B = 0)")
    if z.shape[2] == 0:
        raise ValueError("logits have no classes (C = 0)")
    return z


def check_labels(labels: torch.Tensor, z: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
    """Labels as int64 [B] on the logits' device, range-checked unless the kernel does it; or
    soft targets (floating [B, C] target probabilities: mixup, label smoothing) as given."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 tensor [B], got {type(labels).__name__}")
    if labels.dtype.is_floating_point and labels.dim() == 2:
        if tuple(labels.shape) != (z.shape[1], z.shape[2]):
            raise ValueError(f"soft labels (target probabilities) must be [B, C] = {(z.shape[1], z.shape[2])} "
                             f"like the logits, got shape {tuple(labels.shape)}")
        if labels.device != z.device:
            raise ValueError(f"labels are on {labels.device} but logits are on {z.device}")
        return labels
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64) [B] of classes or a floating tensor [B, C] "
                        f"of target probabilities, got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.dim() != 1 or labels.shape[0] != z.shape[1]:
        raise ValueError(
            f"labels must be [B] with B = {z.shape[1]} (the logits' batch), got shape {tuple(labels.shape)}")
    if labels.device != z.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {z.device}")
    if labels.dtype != torch.int64:
        labels = labels.long()
    # Under torch.compile a data-dependent check would break the graph; the kernels guard
    # the range themselves (an error on CPU, NaN on CUDA).
    if check_range and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= z.shape[2]:
            bad = lo if lo < 0 else hi
            raise IndexError(f"label {bad} is outside [0, C) with C = {z.shape[2]}")
    return labels


def check_scalars(temperature: float, progress: float) -> tuple[float, float]:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    p = float(progress)
    if not math.isfinite(p):
        raise ValueError(f"progress must be finite (k/K in [0, 1]), got {progress}")
    return t, p


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs give float32 losses (accumulation precision); others keep theirs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def canonical_args(logits: LogitsLike, labels: torch.Tensor, gates: GatesLike, temperature: float,
                   progress: float, *, check_range: bool = True):
    z = as_logits(logits)
    y = check_labels(labels, z, check_range=check_range)
    codes = encode_gates(gates, z.shape[0])
    t, p = check_scalars(temperature, progress)
    return z, y, codes, t, p
