"""Feature edges: attention transfer between nodes' intermediate features (issue 10).

The feature loss of an edge s → t is attention transfer (Zagoruyko and Komodakis, 2017):
a stage's output ``F`` [B, C, H, W] becomes its attention map, the channel mean of ``F²``,
flattened and L2-normalised (``q``); the edge's loss is the mean over positions of
``(q_t − q_s)²``, averaged over the batch, times the graph's ``feature_weight`` (β / 2 with
β = 1000, as in their released code). A source map of another spatial size is resized to
the target's (bilinear, antialiased when it shrinks) before it is normalised.

Gates mean what they mean on logit edges (SPEC §2): through 1, cutoff 0, linear the
progress k/K, correct keeps the samples whose *source* predicts the label (its logits'
argmax, ties to the lowest class), dividing by the whole batch. Sources are detached, so a
node's features get gradients only from the edges into it.

:class:`FeatureEdgeLoss` computes every edge at once: the targets of one map size form one
batched product with all the sources resized to that size (``einsum`` of the normalised
maps: ``‖q_t − q_s‖² = ‖q_t‖² + ‖q_s‖² − 2 q_t·q_s``), so the work per step is a handful
of tensor ops per distinct map size, never a Python loop over the M² edges.
:func:`feature_loss_reference` is the plain per-edge loop the tests hold it to.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .gates import Gate

__all__ = ["attention_map", "resize_map", "FeatureEdgeLoss", "feature_loss_reference", "WithFeatures",
           "check_feature_model"]

_EPS = 1e-12  # F.normalize's default: a map of all zeros stays zero instead of NaN


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → the un-normalised attention map ``[B, H, W]`` (channel mean of F²),
    in float32 at least: squares of half-precision activations overflow."""
    if feature.dim() != 4:
        raise ValueError(f"a feature edge needs NCHW features, got a tensor of shape {tuple(feature.shape)}")
    x = feature if feature.dtype == torch.float64 else feature.float()
    return x.pow(2).mean(dim=1)


def resize_map(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An attention map ``[..., H, W]`` resized to ``size``; unchanged when it already has it."""
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    shrink = a.shape[-2] > size[0] or a.shape[-1] > size[1]
    lead = a.shape[:-2]
    out = F.interpolate(a.reshape(-1, 1, *a.shape[-2:]), size=size, mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out.reshape(*lead, *size)


def _normalised(a: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.flatten(-2), dim=-1, eps=_EPS)


def _correct_masks(logits: Sequence[Optional[torch.Tensor]], labels: torch.Tensor, sources: Sequence[int]):
    return torch.stack([(logits[s].detach().argmax(dim=1) == labels) for s in sources])


class FeatureEdgeLoss:
    """Per-node feature losses ``[M]`` of a graph's feature gates (row t: the edges into t).

    ``codes`` are the M×M feature gate codes, row-major (:attr:`Graph.feature_gate_codes`).
    Call it with every node's features (None for a node in no feature edge), every node's
    logits (for the correct gate's masks), the labels and the progress k/K (a float, or a
    0-d tensor under ``torch.compile``).
    """

    def __init__(self, codes: Sequence[int], num_nodes: int, weight: float):
        m = num_nodes
        if len(codes) != m * m:
            raise ValueError(f"{len(codes)} feature gate codes for {m} nodes")
        self.num_nodes = m
        self.weight = float(weight)
        self.codes = [[int(codes[t * m + s]) for s in range(m)] for t in range(m)]
        self.targets = [t for t in range(m) if any(c != Gate.CUTOFF for c in self.codes[t])]
        self.sources = sorted({s for t in self.targets for s in range(m) if self.codes[t][s] != Gate.CUTOFF})
        self.nodes = sorted(set(self.targets) | set(self.sources))
        rows = [[self.codes[t][s] for s in self.sources] for t in self.targets]
        # constant per-edge factors, [targets, sources]: the gate's weight at progress 0 and 1
        self._fixed = torch.tensor([[1.0 if c in (Gate.THROUGH, Gate.CORRECT) else 0.0 for c in row] for row in rows])
        self._linear = torch.tensor([[1.0 if c == Gate.LINEAR else 0.0 for c in row] for row in rows])
        self._correct = torch.tensor([[1.0 if c == Gate.CORRECT else 0.0 for c in row] for row in rows])
        self._any_correct = bool(self._correct.any())
        self._any_linear = bool(self._linear.any())
        # Per step these would be host-to-device copies: made once per device, dtype and map sizes.
        self._consts: dict = {}
        self._groups: dict = {}

    def _factors(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._consts:
            self._consts[key] = tuple(x.to(device, dtype) for x in (self._fixed, self._linear, self._correct))
        return self._consts[key]

    def _size_groups(self, maps: dict, device) -> list:
        """The targets by map size: (size, their rows in the factor matrix, their node indices)."""
        sizes = tuple(tuple(maps[t].shape[-2:]) for t in self.targets)
        key = (device, sizes)
        if key not in self._groups:
            rows_of: dict = {}
            for row, size in enumerate(sizes):
                rows_of.setdefault(size, []).append(row)
            self._groups[key] = [(size, torch.tensor(rows, device=device),
                                  torch.tensor([self.targets[r] for r in rows], device=device), rows)
                                 for size, rows in rows_of.items()]
        return self._groups[key]

    @property
    def active(self) -> bool:
        return bool(self.targets)

    def __call__(self, features: Sequence[Optional[torch.Tensor]], logits: Sequence[Optional[torch.Tensor]],
                 labels: torch.Tensor, progress: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        m = self.num_nodes
        device = labels.device
        dtype = torch.float64 if any(f is not None and f.dtype == torch.float64 for f in features) else torch.float32
        out = torch.zeros(m, dtype=dtype, device=device)
        if not self.targets:
            return out
        maps = {i: attention_map(features[i]) for i in self.nodes}
        b = labels.shape[0]
        # [T, S, B]: each edge's weight per sample (the gate's weight times the correct mask)
        fixed, linear, correct = self._factors(device, dtype)
        factor = fixed
        if self._any_linear:
            factor = factor + linear * (progress.to(device, dtype) if isinstance(progress, torch.Tensor)
                                        else float(progress))
        factor = factor.unsqueeze(-1).expand(-1, -1, b)
        if self._any_correct:
            mask = _correct_masks(logits, labels, self.sources).to(dtype)  # [S, B]
            correct = correct.unsqueeze(-1)
            factor = factor * (1 - correct + correct * mask.unsqueeze(0))
        for size, row_idx, node_idx, rows in self._size_groups(maps, device):
            q_t = torch.stack([_normalised(maps[self.targets[r]]) for r in rows])  # [T', B, P]
            q_s = torch.stack([_normalised(resize_map(maps[s].detach(), size)) for s in self.sources])  # [S, B, P]
            p = q_t.shape[-1]
            dist = (q_t.pow(2).sum(-1).unsqueeze(1) + q_s.pow(2).sum(-1).unsqueeze(0)
                    - 2 * torch.einsum("tbp,sbp->tsb", q_t, q_s)) / p  # [T', S, B]: mean over positions
            per_target = (factor.index_select(0, row_idx) * dist).sum(dim=1).mean(dim=-1) * self.weight
            out = out.index_add(0, node_idx, per_target)
        return out


def feature_loss_reference(features: Sequence[Optional[torch.Tensor]], logits: Sequence[Optional[torch.Tensor]],
                           labels: torch.Tensor, codes: Sequence[int], weight: float,
                           progress: float = 1.0) -> torch.Tensor:
    """The feature losses edge by edge, written the plain way (the tests' yardstick)."""
    m = len(features)
    out = []
    for t in range(m):
        total = torch.zeros((), dtype=torch.float64)
        for s in range(m):
            code = int(codes[t * m + s])
            if code == Gate.CUTOFF:
                continue
            q_t = F.normalize(attention_map(features[t]).flatten(1), dim=1, eps=_EPS)
            a_s = resize_map(attention_map(features[s]).detach(), tuple(features[t].shape[-2:]))
            q_s = F.normalize(a_s.flatten(1), dim=1, eps=_EPS)
            per_sample = (q_t - q_s).pow(2).mean(dim=1)
            w = progress if code == Gate.LINEAR else 1.0
            if code == Gate.CORRECT:
                per_sample = per_sample * (logits[s].argmax(dim=1) == labels).to(per_sample.dtype)
            total = total + weight * w * per_sample.mean()
        out.append(total)
    return torch.stack(out)


def check_feature_model(model: nn.Module, where: str) -> None:
    """A node in a feature edge needs timm's ``forward_intermediates`` and ``forward_head``."""
    missing = [name for name in ("forward_intermediates", "forward_head") if not callable(getattr(model, name, None))]
    if missing:
        raise ValueError(f"{where} has no {' or '.join(missing)}, so it cannot be in a feature edge "
                         "(feature edges read a stage's output through timm's forward_intermediates)")


class WithFeatures(nn.Module):
    """A node's model, returning ``(logits, the output of stage `stage`)`` from one forward.

    It is what gets wrapped for training (DDP must see the call that makes the features, so
    the model's own ``forward_intermediates`` cannot be called past the wrapper); its only
    child is the model, which keeps its own state_dict and optimiser.
    """

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final, intermediates = self.model.forward_intermediates(x, indices=[self.stage])
        return self.model.forward_head(final), intermediates[-1]
