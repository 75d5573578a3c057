"""Edge gates of a Knowledge Transfer Graph (SPEC §2).

``gates[t][s]`` is the gate on the edge from source ``s`` into target ``t``; the
diagonal is the edge from the ground-truth label. The integer codes below are the
ABI shared with ``csrc/ktg_loss.h``: change them in both places or nowhere.
"""
from __future__ import annotations

import difflib
from enum import IntEnum
from typing import Sequence, Union

import torch

__all__ = [
    "Gate",
    "GATE_NAMES",
    "encode_gates",
    "decode_gates",
    "parse_gates",
    "format_gates",
    "gate_weight",
]


class Gate(IntEnum):
    THROUGH = 0
    CUTOFF = 1
    LINEAR = 2
    CORRECT = 3


GATE_NAMES = tuple(g.name.lower() for g in Gate)

GatesLike = Union[torch.Tensor, Sequence[Sequence[Union[str, int, Gate]]]]


def _gate_code(value, where: str) -> int:
    if isinstance(value, Gate):
        return int(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in GATE_NAMES:
            return GATE_NAMES.index(key)
        hint = difflib.get_close_matches(key, GATE_NAMES, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown gate {value!r} at {where}{extra}; gates are {', '.join(GATE_NAMES)}")
    if isinstance(value, bool):
        raise TypeError(f"gate at {where} must be a gate name or code, got a bool")
    if isinstance(value, int):
        if 0 <= value < len(Gate):
            return value
        raise ValueError(f"gate code {value} at {where} is out of range [0, {len(Gate)})")
    raise TypeError(f"gate at {where} must be a gate name (str) or code (int), got {type(value).__name__}")


def encode_gates(gates: GatesLike, num_nodes: int | None = None) -> tuple[int, ...]:
    """Validate an M×M gate matrix and flatten it row-major to integer codes.

    Accepts names (``"through"``…), :class:`Gate` members, ints, or an integer tensor
    of codes. ``num_nodes``, when given, is the M the matrix must match.
    """
    if isinstance(gates, torch.Tensor):
        if gates.dtype.is_floating_point or gates.dtype.is_complex or gates.dtype == torch.bool:
            raise TypeError(f"an encoded gate tensor must have an integer dtype, got {gates.dtype}")
        if gates.dim() != 2 or gates.shape[0] != gates.shape[1]:
            raise ValueError(f"gates must be an M×M matrix, got a tensor of shape {tuple(gates.shape)}")
        rows = gates.tolist()
    else:
        if isinstance(gates, (str, bytes)) or not isinstance(gates, Sequence):
            raise TypeError("gates must be an M×M nested sequence of gate names or an integer tensor")
        rows = list(gates)
    m = len(rows)
    if m == 0:
        raise ValueError("gates must be a non-empty M×M matrix")
    if num_nodes is not None and m != num_nodes:
        raise ValueError(f"gates has {m} rows but the graph has {num_nodes} nodes")
    codes: list[int] = []
    for t, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"gates row {t} must be a sequence of {m} gates, got {type(row).__name__}")
        if len(row) != m:
            raise ValueError(f"gates must be M×M: row {t} has {len(row)} entries, expected {m}")
        codes.extend(_gate_code(v, f"gates[{t}][{s}]") for s, v in enumerate(row))
    return tuple(codes)


def decode_gates(codes: Sequence[int]) -> list[list[str]]:
    """Inverse of :func:`encode_gates`: flat codes back to an M×M matrix of names."""
    m = int(round(len(codes) ** 0.5))
    if m * m != len(codes):
        raise ValueError(f"{len(codes)} gate codes do not form a square matrix")
    return [[GATE_NAMES[codes[t * m + s]] for s in range(m)] for t in range(m)]


def parse_gates(text: str, num_nodes: int | None = None) -> list[list[str]]:
    """Parse the CLI form ``"through,cutoff;correct,through"`` (rows split by ``;``)."""
    rows = [r for r in (row.strip() for row in text.strip().split(";")) if r]
    matrix = [[g.strip().lower() for g in row.split(",")] for row in rows]
    encode_gates(matrix, num_nodes)  # validates, with errors that name the bad entry
    return matrix


def format_gates(gates: GatesLike) -> str:
    """The CLI form of a gate matrix (inverse of :func:`parse_gates`)."""
    return ";".join(",".join(row) for row in decode_gates(encode_gates(gates)))


def gate_weight(code: int, progress: float) -> float:
    """The scalar weight of a gate; the correct gate's per-sample mask is separate."""
    if code == Gate.CUTOFF:
        return 0.0
    if code == Gate.LINEAR:
        return float(progress)
    return 1.0
