"""The fused Knowledge Transfer Graph loss: the public API over the compiled op.

The C++/CUDA library (``csrc/``) registers ``timm_dcl::ktg_loss`` with its autograd
formula in C++ (a training step runs no Python between the forward and the backward
kernel), and the internal ``timm_dcl::ktg_loss_forward`` / ``ktg_loss_backward`` that it
calls. This module gives them fake kernels (so ``torch.compile`` can trace them), keeps
the Python side of a call to a few attribute reads, and falls back to the reference
where no compiled kernel exists for the logits' device.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..gates import GatesLike, encode_gates
from ._extension import load_extension
from .inputs import LogitsLike, as_logits, check_scalars, result_dtype
from .reference import ktg_loss_reference

__all__ = ["ktg_loss", "KTGLoss", "KTGLossFunction", "kernels_available", "MAX_NODES"]

# Edge accumulators live in registers/shared memory; beyond this the reference runs.
MAX_NODES = 16
# Columns of the forward's statistics kept for the backward (csrc/ktg_loss.h, StatCol).
STAT_COLS = 4

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


def _shape(logits) -> tuple[int, int]:
    """(M, B) of the op's logits argument: [z] with z [M, B, C], or M tensors [B, C]."""
    if len(logits) == 1 and logits[0].dim() == 3:
        return logits[0].shape[0], logits[0].shape[1]
    return len(logits), logits[0].shape[0]


if _LOADED:
    @torch.library.register_fake("timm_dcl::ktg_loss")
    def _loss_fake(logits, labels, gates, temperature=1.0, progress=1.0, progress_tensor=None):
        m, _ = _shape(logits)
        return logits[0].new_empty((m,), dtype=result_dtype(logits[0].dtype))

    @torch.library.register_fake("timm_dcl::ktg_loss_forward")
    def _forward_fake(logits, labels, gates, temperature, progress, progress_tensor):
        m, b = _shape(logits)
        torch._check(len(gates) == m * m, lambda: f"gates must hold M*M = {m * m} codes")
        losses = logits[0].new_empty((m,), dtype=result_dtype(logits[0].dtype))
        stats = logits[0].new_empty((m, b, STAT_COLS), dtype=_stats_dtype(logits[0].dtype))
        return losses, stats

    @torch.library.register_fake("timm_dcl::ktg_loss_backward")
    def _backward_fake(grad_losses, logits, labels, stats, gates, temperature, progress, progress_tensor):
        return [torch.empty_like(z, memory_format=torch.contiguous_format) for z in logits]

    _loss_op = torch.ops.timm_dcl.ktg_loss.default


class KTGLossFunction(torch.autograd.Function):
    """The internal forward and backward ops as a Python ``autograd.Function``.

    ``timm_dcl.ktg_loss`` does not use it (its autograd is registered in C++, which costs
    less per call); it remains for code that composes the two kernels itself. Arguments
    are canonical: logits [M, B, C], int64 labels [B], M*M gate codes, and float
    temperature and progress.
    """

    @staticmethod
    def forward(logits, labels, gates, temperature, progress):
        return torch.ops.timm_dcl.ktg_loss_forward([logits], labels, list(gates), temperature, progress, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, gates, temperature, progress = inputs
        ctx.save_for_backward(logits, labels, output[1])
        ctx.gates, ctx.temperature, ctx.progress = list(gates), temperature, progress
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_losses, grad_stats):
        logits, labels, stats = ctx.saved_tensors
        (grad,) = torch.ops.timm_dcl.ktg_loss_backward(
            grad_losses, [logits], labels, stats, ctx.gates, ctx.temperature, ctx.progress, None)
        return grad, None, None, None, None


def _op_logits(logits: LogitsLike):
    """The logits as the op takes them, without a copy: ([z], M, device type) for a tensor
    [M, B, C], (list, M, device type) for M tensors [B, C]. Bad input raises the error of
    ``as_logits``; the op checks the rest (shapes, dtypes, devices) in C++."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() == 3:
            return (logits,), logits.shape[0], logits.device.type
    elif isinstance(logits, (list, tuple)) and logits:
        first = logits[0]
        if isinstance(first, torch.Tensor) and (len(logits) > 1 or first.dim() == 2):
            return logits, len(logits), first.device.type
    z = as_logits(logits)  # raises for bad input; stacks any other sequence type
    return (z,), z.shape[0], z.device.type


# Gate matrices given by name, encoded once: a training loop passes the same names every
# step. Only all-str matrices are cached, since equal tuples of other values need not
# encode alike (1 == True == Gate.CUTOFF, and a bool is an error).
_CODES_CACHE: dict = {}


def _gate_codes(gates: GatesLike, m: int) -> tuple[int, ...]:
    if torch.compiler.is_compiling():
        # Traced once into constants; touching the cache would guard on its contents.
        return encode_gates(gates, m)
    key = None
    if not isinstance(gates, torch.Tensor):
        try:
            key = (m, tuple(map(tuple, gates)))
            codes = _CODES_CACHE.get(key)
        except TypeError:  # not a nested sequence, or unhashable entries: encode_gates says why
            key = codes = None
        if codes is not None:
            return codes
    codes = encode_gates(gates, m)
    if key is not None and all(type(v) is str for row in key[1] for v in row):
        if len(_CODES_CACHE) >= 256:
            _CODES_CACHE.clear()
        _CODES_CACHE[key] = codes
    return codes


def _call_op(parts, logits, labels, codes, temperature, progress) -> torch.Tensor:
    try:
        if isinstance(progress, torch.Tensor):
            return _loss_op(parts, labels, codes, temperature, 1.0, progress)
        if torch.compiler.is_compiling():
            # A float that changes every step would be a new constant of the graph each
            # time (the op's float argument cannot be symbolic): pass it as a tensor. The
            # product, unlike torch.tensor/full, keeps it a graph input once dynamo has
            # made the float dynamic (after its first change).
            return _loss_op(parts, labels, codes, temperature, 1.0,
                            torch.ones((), dtype=torch.float64) * progress)
        return _loss_op(parts, labels, codes, temperature, progress, None)
    except (TypeError, RuntimeError):
        if parts is logits and not all(isinstance(z, torch.Tensor) for z in logits):
            as_logits(logits)  # a non-tensor in the list: raise its clear error
        raise


def ktg_loss(logits: LogitsLike, labels: torch.Tensor, gates: GatesLike, *,
             temperature: float = 1.0, progress: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-node losses ``L_t`` [M] of a Knowledge Transfer Graph (SPEC §2), fused.

    Args:
        logits: [M, B, C] or a sequence of M tensors [B, C] (read in place, not stacked);
            float16/bfloat16/float32/float64.
        labels: integer [B].
        gates: M×M gate names (``gates[t][s]``: edge from source s into target t; the
            diagonal is the label edge) or an integer tensor of gate codes.
        temperature: T of the knowledge edges.
        progress: k/K, the weight of linear gates: a float, or a one-element tensor (on
            the CPU or the logits' device) that a compiled step can change every call
            without recompiling.

    Returns float32 losses for half-precision logits, the logits' dtype otherwise. Each
    ``L_t`` back-propagates only into ``z_t``. On CUDA an out-of-range label gives NaN
    losses instead of an error (checking would synchronise the device).
    """
    parts, m, device = _op_logits(logits)
    if device not in _KERNEL_DEVICES or m > MAX_NODES:
        return ktg_loss_reference(logits, labels, gates, temperature=temperature, progress=progress)
    return _call_op(parts, logits, labels, _gate_codes(gates, m), temperature, progress)


class KTGLoss(nn.Module):
    """The loss of one graph: gates and temperature validated and encoded once.

    ``loss_fn(logits, labels, progress=k/K)`` returns the per-node losses [M]; sum them
    for one backward pass that gives every node exactly its own gradient. ``progress``
    may be a float or a one-element tensor (see :func:`ktg_loss`).
    """

    def __init__(self, gates: GatesLike, temperature: float = 1.0):
        super().__init__()
        self.codes = encode_gates(gates)
        self.num_nodes = int(round(len(self.codes) ** 0.5))
        self.temperature, _ = check_scalars(temperature, 1.0)

    def forward(self, logits: LogitsLike, labels: torch.Tensor,
                progress: float | torch.Tensor = 1.0) -> torch.Tensor:
        parts, m, device = _op_logits(logits)
        if m != self.num_nodes:
            raise ValueError(f"this loss has {self.num_nodes} nodes but got logits of {m}")
        if device not in _KERNEL_DEVICES or m > MAX_NODES:
            return ktg_loss_reference(logits, labels, self.codes_matrix(), temperature=self.temperature,
                                      progress=progress)
        return _call_op(parts, logits, labels, self.codes, self.temperature, progress)

    def codes_matrix(self) -> list[list[int]]:
        m = self.num_nodes
        return [list(self.codes[t * m:(t + 1) * m]) for t in range(m)]

    def extra_repr(self) -> str:
        from ..gates import format_gates
        return f"gates={format_gates(self.codes_matrix())!r}, temperature={self.temperature}"
