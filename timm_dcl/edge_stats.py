"""Edge diagnostics: what every open edge of the graph did during an epoch, from a sample of batches.

For every edge s→t that is not cut off: the mean per-sample edge loss l^{s→t} before its gate
(SPEC §2: CE with the label on the diagonal, T²·KL(p_s || p_t) elsewhere), the fraction of
samples whose source s is right (argmax = label: what a correct gate keeps; 1 on the diagonal,
where the source is the label), and the gate's weight (k/K for a linear gate, else 1).

The fused loss op returns only each node's gated sum, so the per-edge values are recomputed
here in plain PyTorch from detached logits, on every N-th batch only (``--edge-stats-every``):
they are a sample of the epoch, cheap enough not to slow the training step.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .gates import Gate

__all__ = ["edge_losses", "EdgeStats", "EDGE_FIELDS"]

#: The M×M fields an epoch record gets (null for cutoff edges).
EDGE_FIELDS = ("edge_loss", "edge_kept", "edge_weight")


@torch.no_grad()
def edge_losses(logits: Sequence[torch.Tensor], labels: torch.Tensor, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses of all M×M edges at once and each source's correctness.

    Returns ``loss[t, s, b]`` (float32: CE on the diagonal, T²·KL(p_s || p_t) off it) and
    ``correct[s, b]`` (bool: argmax of source s equals the label; ties go to the lowest index).
    """
    z = torch.stack([x.detach().float() for x in logits])  # M, B, C
    t = float(temperature)
    logp = torch.log_softmax(z / t, dim=-1)
    p = logp.exp()
    # KL(p_s || p_t) = Σ_c p_s log p_s − Σ_c p_s log p_t: one einsum for all pairs instead of
    # an M×M×B×C tensor of differences.
    neg_entropy = (p * logp).sum(-1)  # s, b
    cross = torch.einsum("sbc,tbc->tsb", p, logp)
    loss = (neg_entropy.unsqueeze(0) - cross) * (t * t)
    idx = labels.view(1, -1, 1).expand(z.shape[0], -1, 1)
    ce = -torch.log_softmax(z, dim=-1).gather(-1, idx).squeeze(-1)  # t, b (label edges: no temperature)
    diag = torch.arange(z.shape[0], device=z.device)
    loss[diag, diag] = ce
    correct = z.argmax(dim=-1) == labels.unsqueeze(0)
    return loss, correct


class EdgeStats:
    """Sums of the per-batch edge means over an epoch's sampled batches (kept on the device:
    adding a batch never synchronises with the host)."""

    def __init__(self, gate_codes: Sequence[int], num_nodes: int, temperature: float, device):
        m = num_nodes
        codes = torch.tensor(list(gate_codes), dtype=torch.long).view(m, m)
        self.m, self.temperature = m, float(temperature)
        self.open = (codes != Gate.CUTOFF).tolist()
        self.linear = (codes == Gate.LINEAR).to(device)
        self.loss = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.kept = torch.zeros(m, dtype=torch.float64, device=device)
        self.progress = torch.zeros((), dtype=torch.float64, device=device)
        self.batches = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, logits: Sequence[torch.Tensor], labels: torch.Tensor, progress: float) -> None:
        loss, correct = edge_losses(logits, labels, self.temperature)
        self.loss += loss.mean(-1).double()
        self.kept += correct.double().mean(-1)
        self.progress += float(progress)
        self.batches += 1

    def record(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
        """The epoch's M×M fields (``reduce`` sums a tensor over processes), or {} when no batch
        was sampled."""
        flat = torch.cat([self.loss.flatten(), self.kept, self.progress.view(1), self.batches.view(1)])
        if reduce is not None:
            flat = reduce(flat)
        m = self.m
        batches = float(flat[-1])
        if batches == 0:
            return {}
        mean = flat[:-1] / batches
        # KL ≥ 0 exactly; the einsum's difference of two sums can round a hair below zero.
        loss = mean[:m * m].view(m, m).clamp_min(0.0).tolist()
        source_right = mean[m * m:m * m + m].tolist()
        progress = float(mean[-1])
        linear = self.linear.tolist()
        out = {name: [[None] * m for _ in range(m)] for name in EDGE_FIELDS}
        for t in range(m):
            for s in range(m):
                if not self.open[t][s]:
                    continue
                out["edge_loss"][t][s] = loss[t][s]
                out["edge_kept"][t][s] = 1.0 if s == t else source_right[s]
                out["edge_weight"][t][s] = progress if linear[t][s] else 1.0
        out["edge_batches"] = int(batches)
        return out
