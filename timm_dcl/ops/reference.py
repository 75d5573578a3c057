"""The executable specification of the Knowledge Transfer Graph loss (SPEC §2).

Plain, edge-by-edge PyTorch, written to be read rather than to be fast: the fused
kernels in ``csrc/`` are tested against this function, value and gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gates import Gate, GatesLike, gate_weight
from .inputs import LogitsLike, canonical_args, result_dtype

__all__ = ["ktg_loss_reference"]


def ktg_loss_reference(logits: LogitsLike, labels: torch.Tensor, gates: GatesLike, *,
                       temperature: float = 1.0, progress: float = 1.0) -> torch.Tensor:
    """Per-node losses ``L_t`` of a Knowledge Transfer Graph, shape [M].

    ``L_t = Σ_s G_{t,s}(l^{s→t})`` with the label cross-entropy on the diagonal and
    ``T² · KL(softmax(z_s/T) || softmax(z_t/T))`` off it; sources are detached, so the
    gradient of ``L_t`` flows only into ``z_t``.

    ``labels`` are classes (integer [B]) or soft targets (floating [B, C] target
    probabilities y, as mixup and label smoothing give, constants): the label edge is then
    ``−Σ_c y_c log softmax(z_t)_c`` and a correct gate keeps the samples whose source's
    argmax is the target's argmax.
    """
    z, y, codes, T, progress = canonical_args(logits, labels, gates, temperature, progress)
    M = z.shape[0]
    out_dtype = result_dtype(z.dtype)
    z = z.to(out_dtype)  # half precision is computed in float32
    soft = y.is_floating_point()
    if soft:
        y = y.detach().to(out_dtype)  # read in the accumulation dtype, as the kernels do

    log_q = F.log_softmax(z / T, dim=-1)          # targets' tempered log-probabilities
    log_p = log_q.detach()                        # the same, as constant sources
    p = log_p.exp()
    # torch.argmax returns the first maximal index: ties go to the lowest class, as SPEC says.
    classes = y.argmax(dim=-1) if soft else y
    correct = (z.detach().argmax(dim=-1) == classes).to(out_dtype)  # [M, B]

    losses = []
    for t in range(M):
        loss_t = z.new_zeros(())
        for s in range(M):
            code = codes[t * M + s]
            if code == Gate.CUTOFF:
                continue
            if s == t:
                # On the label edge "correct" is "through": the label is always right.
                per_sample = (-(y * F.log_softmax(z[t], dim=-1)).sum(dim=-1) if soft
                              else F.cross_entropy(z[t], y, reduction="none"))
            else:
                per_sample = T * T * (p[s] * (log_p[s] - log_q[t])).sum(dim=-1)
                if code == Gate.CORRECT:
                    per_sample = per_sample * correct[s]
            # Mean over the whole batch: masked samples still count in the denominator.
            loss_t = loss_t + gate_weight(code, progress) * per_sample.mean()
        losses.append(loss_t)
    return torch.stack(losses)
