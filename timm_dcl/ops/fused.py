"""The fused Knowledge Transfer Graph loss: custom op, autograd, and the public API.

The C++/CUDA kernels (``csrc/``) register ``timm_dcl::ktg_loss_forward`` and
``timm_dcl::ktg_loss_backward``; this module gives them fake kernels (so
``torch.compile`` can trace them), an autograd formula, and falls back to the
reference where no compiled kernel exists for the logits' device.
"""
from __future__ import annotations

import warnings
import torch
from torch import nn

from ..gates import GatesLike, encode_gates
from ._extension import load_extension
from .inputs import LogitsLike, as_logits, check_labels, check_scalars, result_dtype
from .reference import ktg_loss_reference

__all__ = ["ktg_loss", "KTGLoss", "KTGLossFunction", "kernels_available", "MAX_NODES"]

# Edge accumulators live in registers/shared memory; beyond this the reference runs.
MAX_NODES = 16

_OP = "timm_dcl::ktg_loss_forward"
_LOADED, _LOAD_ERROR = load_extension()
_KERNEL_DEVICES: frozenset[str] = frozenset()
if _LOADED:
    _KERNEL_DEVICES = frozenset(
        d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(_OP, d.upper()))
else:
    warnings.warn(
        f"timm_dcl: the compiled KTG loss kernels are unavailable ({_LOAD_ERROR}); using the slower "
        "pure-PyTorch reference. Build them with `pip install -e . --no-build-isolation` from the "
        "repository root (CUDA_HOME set for the CUDA kernels).", RuntimeWarning, stacklevel=2)


def kernels_available() -> set[str]:
    """Device types with compiled kernels: {"cpu"}, {"cpu", "cuda"}, or set() on the fallback."""
    return set(_KERNEL_DEVICES)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _LOADED:
    @torch.library.register_fake("timm_dcl::ktg_loss_forward")
    def _forward_fake(logits, labels, gates, temperature, progress):
        m, b, _ = logits.shape
        torch._check(len(gates) == m * m, lambda: f"gates must hold M*M = {m * m} codes")
        losses = logits.new_empty((m,), dtype=result_dtype(logits.dtype))
        stats = logits.new_empty((m, b, 3), dtype=_stats_dtype(logits.dtype))
        return losses, stats

    @torch.library.register_fake("timm_dcl::ktg_loss_backward")
    def _backward_fake(grad_losses, logits, labels, stats, gates, temperature, progress):
        return torch.empty_like(logits)

    def _setup_context(ctx, inputs, output):
        logits, labels, gates, temperature, progress = inputs
        ctx.save_for_backward(logits, labels, output[1])
        ctx.gates, ctx.temperature, ctx.progress = gates, temperature, progress

    def _backward(ctx, grad_losses, _grad_stats):
        logits, labels, stats = ctx.saved_tensors
        grad = torch.ops.timm_dcl.ktg_loss_backward(
            grad_losses.contiguous(), logits, labels, stats, ctx.gates, ctx.temperature, ctx.progress)
        return grad, None, None, None, None

    # The raw op is differentiable too, for users of torch.ops.timm_dcl directly.
    torch.library.register_autograd(
        "timm_dcl::ktg_loss_forward", _backward, setup_context=_setup_context)


class KTGLossFunction(torch.autograd.Function):
    """Autograd wrapper of the fused op: forward and backward are one kernel each.

    Arguments are already canonical: logits [M, B, C] contiguous, int64 labels [B],
    a tuple of M*M gate codes, and float temperature and progress.
    """

    @staticmethod
    def forward(logits, labels, gates, temperature, progress):
        return torch.ops.timm_dcl.ktg_loss_forward(logits, labels, list(gates), temperature, progress)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_losses, grad_stats):
        return _backward(ctx, grad_losses, grad_stats)


def _use_kernel(z: torch.Tensor) -> bool:
    return z.device.type in _KERNEL_DEVICES and z.shape[0] <= MAX_NODES


def _fused(z: torch.Tensor, labels: torch.Tensor, codes, temperature: float, progress: float) -> torch.Tensor:
    # The op itself carries the autograd formula: calling it directly skips the ~30 µs that
    # autograd.Function.apply spends binding arguments, a large share at small shapes.
    losses, _ = torch.ops.timm_dcl.ktg_loss_forward(z.contiguous(), labels, codes, temperature, progress)
    return losses


def ktg_loss(logits: LogitsLike, labels: torch.Tensor, gates: GatesLike, *,
             temperature: float = 1.0, progress: float = 1.0) -> torch.Tensor:
    """Per-node losses ``L_t`` [M] of a Knowledge Transfer Graph (SPEC §2), fused.

    Args:
        logits: [M, B, C] or a sequence of M tensors [B, C]; float16/bfloat16/float32/float64.
        labels: int64 [B].
        gates: M×M gate names (``gates[t][s]``: edge from source s into target t; the
            diagonal is the label edge) or an integer tensor of gate codes.
        temperature: T of the knowledge edges.
        progress: k/K, the weight of linear gates.

    Returns float32 losses for half-precision logits, the logits' dtype otherwise. Each
    ``L_t`` back-propagates only into ``z_t``. On CUDA an out-of-range label gives NaN
    losses instead of an error (checking would synchronise the device).
    """
    z = as_logits(logits)
    if not _use_kernel(z):
        return ktg_loss_reference(z, labels, gates, temperature=temperature, progress=progress)
    # The CPU kernel range-checks labels itself; CUDA marks bad samples NaN without a sync.
    y = check_labels(labels, z, check_range=False)
    codes = list(encode_gates(gates, z.shape[0]))
    t, p = check_scalars(temperature, progress)
    return _fused(z, y, codes, t, p)


class KTGLoss(nn.Module):
    """The loss of one graph: gates and temperature fixed, called once per step.

    ``loss_fn(logits, labels, progress=k/K)`` returns the per-node losses [M]; sum them
    for one backward pass that gives every node exactly its own gradient.
    """

    def __init__(self, gates: GatesLike, temperature: float = 1.0):
        super().__init__()
        self.codes = list(encode_gates(gates))
        self.num_nodes = int(round(len(self.codes) ** 0.5))
        self.temperature, _ = check_scalars(temperature, 1.0)

    def forward(self, logits: LogitsLike, labels: torch.Tensor, progress: float = 1.0) -> torch.Tensor:
        z = as_logits(logits)
        if z.shape[0] != self.num_nodes:
            raise ValueError(f"this loss has {self.num_nodes} nodes but got logits of {z.shape[0]}")
        if not _use_kernel(z):
            return ktg_loss_reference(z, labels, self.codes_matrix(), temperature=self.temperature,
                                      progress=progress)
        y = check_labels(labels, z, check_range=False)
        _, p = check_scalars(self.temperature, progress)
        return _fused(z, y, self.codes, self.temperature, p)

    def codes_matrix(self) -> list[list[int]]:
        m = self.num_nodes
        return [list(self.codes[t * m:(t + 1) * m]) for t in range(m)]

    def extra_repr(self) -> str:
        from ..gates import format_gates
        return f"gates={format_gates(self.codes_matrix())!r}, temperature={self.temperature}"
