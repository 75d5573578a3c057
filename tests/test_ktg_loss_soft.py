"""Soft targets in the fused KTG loss: ``labels`` as float [B, C] target probabilities
(mixup, CutMix, label smoothing) against the reference, by gradcheck, and one-hot targets
against integer labels bit for bit.

The label edge is −Σ_c y_c log softmax(z_t)_c; a correct gate keeps a sample when the
source's argmax is the target's argmax.
"""
from __future__ import annotations

import pytest
import torch

import timm_dcl
from timm_dcl import KTGLoss, ktg_loss, ktg_loss_reference

from test_ktg_loss import (HALF, RTOL, assert_mixed_correct_mask, assert_scaled_close, loss_and_grad, make_case,
                           needs_kernel)

CLASSES = (2, 10, 37, 100, 1000)  # below, at and above every lane width, and the moved-back last chunk


def soft_targets(labels: torch.Tensor, C: int, seed: int, *, keep: float = 0.6, total: float = 1.0) -> torch.Tensor:
    """float64 [B, C] targets with ``keep`` on each label and the rest spread at random, so
    their argmax is the label (the correct gates' masks stay those of ``make_case``);
    each row sums to ``total``."""
    gen = torch.Generator().manual_seed(seed)
    rest = torch.rand(labels.shape[0], C, generator=gen, dtype=torch.float64) ** 3
    rest = rest / rest.sum(1, keepdim=True) * (1.0 - keep)
    y = rest + keep * torch.nn.functional.one_hot(labels, C).double()
    return y * total


def soft_case(seed: int, M: int, B: int, C: int, T: float = 1.0, progress: float = 0.5, gates=None, **kwargs):
    case, z, labels = make_case(seed, M, B, C, T, progress, gates)
    return case, z, labels, soft_targets(labels, C, seed + 7, **kwargs)


def check_soft_parity(case, z64, y64, labels, dtype, device) -> None:
    z = z64.to(device=device, dtype=dtype)
    y = y64.to(device=device, dtype=torch.float32 if dtype in HALF else dtype)
    z_ref = z.float() if dtype in HALF else z
    assert_mixed_correct_mask(z_ref.cpu(), labels)
    weights = torch.randn(case.M, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64).to(device)
    got, got_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, case.progress, weights)
    want, want_grad = loss_and_grad(ktg_loss_reference, z_ref, y, case.gates, case.T, case.progress, weights)
    rtol_value, rtol_grad = RTOL[dtype]
    assert got.dtype == want.dtype and got_grad.dtype == dtype
    assert_scaled_close(got, want, rtol_value, f"losses of {case} with soft targets in {dtype}")
    assert_scaled_close(got_grad, want_grad, rtol_grad, f"gradient of {case} with soft targets in {dtype}")


def soft_parity_cases(n: int, first_seed: int):
    for i in range(n):
        B, C = (1, 3, 64, 130)[i % 4], CLASSES[(i // 4) % 5]
        M = 1 + (3 * i + i // 8) % 8
        if B * C * M > 300_000:
            M = max(2, 300_000 // (B * C))
        T = (1.0, 2.0, 4.0)[i % 3]
        progress = (0.0, 1.0, 0.25, 0.8)[i % 4]
        # rows that sum to 1, and some that do not (the label edge is −Σ y log p for any y)
        yield soft_case(first_seed + i, M, B, C, T, progress, total=1.0 if i % 5 else 0.7)


# ----------------------------------------------------------------------------- against the reference

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_soft_parity_with_reference(device, dtype):
    needs_kernel(device)
    for case, z, labels, y in soft_parity_cases(20, first_seed=5000):
        check_soft_parity(case, z, y, labels, dtype, device)


@pytest.mark.parametrize("dtype", HALF)
def test_soft_parity_half_precision(device, dtype):
    needs_kernel(device)
    for case, z, labels, y in soft_parity_cases(10, first_seed=6000):
        check_soft_parity(case, z, y, labels, dtype, device)


def test_reference_soft_label_edge_is_soft_cross_entropy():
    """The reference's soft label edge is timm's SoftTargetCrossEntropy (one node, label edge only)."""
    from timm.loss import SoftTargetCrossEntropy

    _, z, labels, y = soft_case(1, 1, 6, 9)
    want = SoftTargetCrossEntropy()(z[0], y)
    torch.testing.assert_close(ktg_loss_reference(z, y, [["through"]])[0], want, rtol=1e-13, atol=0)
    torch.testing.assert_close(ktg_loss(z, y, [["through"]])[0], want, rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("M", [1, 3])
def test_soft_gradcheck(device, M, T):
    needs_kernel(device)
    gates = None if M == 1 else [["through", "correct", "linear"], ["linear", "correct", "through"],
                                 ["correct", "through", "cutoff"]]
    case, z, labels, y = soft_case(300 + M, M, 4, 6, T=T, progress=0.61, gates=gates, total=0.9)
    assert_mixed_correct_mask(z, labels)
    z, y = z.to(device), y.to(device)
    for t in range(M):
        def loss_t(zt, t=t):
            full = torch.cat([z[:t], zt.unsqueeze(0), z[t + 1:]])
            return ktg_loss(full, y, case.gates, temperature=case.T, progress=case.progress)[t]

        zt = z[t].detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(loss_t, (zt,), eps=1e-6, atol=1e-8, rtol=1e-6), f"target {t}"


# ----------------------------------------------------------------------------- one-hot = integer labels

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [3, 10, 100, 1000])
def test_one_hot_equals_integer_labels_bit_for_bit(device, C, dtype):
    needs_kernel(device)
    for seed, M, B, T in ((1, 3, 5, 1.0), (2, 4, 17, 2.0), (3, 2, 64, 3.0)):
        case, z, labels = make_case(400 + seed + C, M, B, C, T=T, progress=0.37)
        z, labels = z.to(device=device, dtype=dtype), labels.to(device)
        one_hot = torch.nn.functional.one_hot(labels, C).to(dtype)
        weights = torch.linspace(0.5, 1.5, M, dtype=dtype, device=device)
        got, got_grad = loss_and_grad(ktg_loss, z, one_hot, case.gates, case.T, case.progress, weights)
        want, want_grad = loss_and_grad(ktg_loss, z, labels, case.gates, case.T, case.progress, weights)
        assert torch.equal(got, want), f"{case}: {got.tolist()} != {want.tolist()}"
        assert torch.equal(got_grad, want_grad), f"{case}: gradients differ by {(got_grad - want_grad).abs().max()}"


def test_correct_gate_reads_the_targets_argmax(device):
    """Without label edges the loss sees the targets only through the correct gates' masks:
    soft targets give exactly the loss of the integer labels that are their argmax, which
    here differ from the labels the logits were built around."""
    needs_kernel(device)
    gates = [["cutoff", "correct", "correct"], ["correct", "cutoff", "through"], ["linear", "correct", "cutoff"]]
    _, z, labels = make_case(9, 3, 40, 12, T=2.0)
    gen = torch.Generator().manual_seed(1)
    y = torch.rand(40, 12, generator=gen, dtype=torch.float64)
    y[:20] = torch.nn.functional.one_hot(labels[:20], 12).double() * 0.5 + 0.04  # argmax: the label, half the time
    y[5, 3] = y[5, 7] = 2.0  # a tie: the lowest class wins
    classes = y.argmax(1)
    assert classes[5] == 3
    for dtype in (torch.float64, torch.float32):
        zz = z.to(device=device, dtype=dtype)
        got = ktg_loss(zz, y.to(device=device, dtype=dtype), gates, temperature=2.0)
        want = ktg_loss(zz, classes.to(device), gates, temperature=2.0)
        assert torch.equal(got, want)
        ref = ktg_loss_reference(zz, y.to(device=device, dtype=dtype), gates, temperature=2.0)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _argmax_rows(C: int, seed: int) -> torch.Tensor:
    """float64 [B, C] targets whose argmax is hard to get right: ties in different lanes
    and in the moved-back last chunk, a NaN (which wins, as in torch.argmax), negative
    rows, all −inf, the maximum in the first or the last class."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.rand(12, C, generator=gen, dtype=torch.float64)
    y[1, C - 1] = 3.0
    y[2, 0] = 3.0
    y[3, C // 2] = y[3, C - 1] = 3.0  # tie: the lower class
    y[4, C - 1] = y[4, max(C - 17, 0)] = 3.0
    y[5, C // 3] = float("nan")
    y[6, C - 1] = float("nan")
    y[6, 0] = float("nan")  # two NaNs: the first
    y[7] = -torch.rand(C, generator=gen, dtype=torch.float64) - 1.0
    y[8] = float("-inf")
    y[9] = 0.25  # all equal: class 0
    y[10, C - 1] = float("inf")
    return y


def check_target_argmax(device: torch.device) -> None:
    """The correct gates with soft targets use the targets' torch.argmax: with no label edge
    the losses equal those of those integer classes exactly."""
    gates = [["cutoff", "correct", "correct"], ["correct", "cutoff", "correct"], ["linear", "correct", "cutoff"]]
    for C in (1, 2, 7, 15, 16, 17, 31, 33, 64, 100, 1000):
        y = _argmax_rows(C, C)
        classes = y.argmax(1)
        z = torch.randn(3, 12, C, generator=torch.Generator().manual_seed(C), dtype=torch.float64)
        # logits whose argmax is the target's class in about half the rows, so masks vary
        z[1, ::2] += 5.0 * torch.nn.functional.one_hot(classes[::2], C)
        for dtype in (torch.float64, torch.float32):
            zz = z.to(device=device, dtype=dtype)
            got = ktg_loss(zz, y.to(device=device, dtype=dtype), gates, temperature=2.0)
            want = ktg_loss(zz, classes.to(device), gates, temperature=2.0)
            assert torch.equal(got, want), (C, dtype, got, want)


def test_correct_gate_target_argmax_ties_nan_and_lanes(device):
    needs_kernel(device)
    check_target_argmax(device)


def test_correct_gate_target_argmax_on_every_cpu_isa():
    """The CPU kernel finds the targets' argmax itself, in lanes of the ISA it picks at run
    time: check the narrower ISAs' paths too (TIMM_DCL_CPU_ISA is read once a process)."""
    needs_kernel(torch.device("cpu"))
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys, torch; sys.path.insert(0, %r); import test_ktg_loss_soft as t; "
            "t.check_target_argmax(torch.device('cpu')); print('ok')" % here)
    for isa in ("avx2", "base"):
        env = dict(os.environ, TIMM_DCL_CPU_ISA=isa)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (isa, done.stdout[-2000:], done.stderr[-2000:])


def test_zero_target_row_gives_zero_label_loss(device):
    needs_kernel(device)
    _, z, labels, y = soft_case(11, 2, 4, 7)
    y[2] = 0.0
    gates = [["through", "cutoff"], ["cutoff", "through"]]
    zz = z.to(device).requires_grad_(True)
    losses = ktg_loss(zz, y.to(device), gates)
    losses.sum().backward()
    assert torch.isfinite(zz.grad).all() and torch.count_nonzero(zz.grad[:, 2]) == 0
    want = ktg_loss_reference(z.to(device), y.to(device), gates)
    torch.testing.assert_close(losses.detach(), want, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- API forms

def test_soft_targets_through_timm_mixup(device):
    """What timm's Mixup hands the trainer (mixup or CutMix, label smoothing) goes straight in."""
    needs_kernel(device)
    from timm.data import Mixup

    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    x = torch.rand(8, 3, 8, 8, device=device)
    x, y = mixup(x, torch.arange(8, device=device) % 10)
    assert y.shape == (8, 10) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(8, device=device))
    z = torch.randn(3, 8, 10, device=device)
    gates = [["through", "correct", "through"], ["through"] * 3, ["linear", "through", "through"]]
    torch.testing.assert_close(ktg_loss(z, y, gates, progress=0.3), ktg_loss_reference(z, y, gates, progress=0.3),
                               rtol=1e-5, atol=1e-6)


def test_soft_module_list_form_and_target_dtype(device):
    needs_kernel(device)
    case, z, labels, y = soft_case(12, 3, 9, 13, T=2.0, progress=0.4)
    z = z.float().to(device)
    loss_fn = KTGLoss(case.gates, temperature=2.0)
    want = ktg_loss_reference(z, y.float().to(device), case.gates, temperature=2.0, progress=0.4)
    parts = [zn.clone().requires_grad_(True) for zn in z]
    for targets in (y.float(), y, y.half()):  # converted to the accumulation dtype
        got = loss_fn(parts, targets.to(device), progress=0.4)
        tol = 1e-3 if targets.dtype == torch.float16 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in parts)


def test_soft_opcheck(device):
    needs_kernel(device)
    loss = torch.ops.timm_dcl.ktg_loss.default
    fwd = torch.ops.timm_dcl.ktg_loss_forward.default
    bwd = torch.ops.timm_dcl.ktg_loss_backward.default
    for seed, dtype, form in ((91, torch.float32, "tensor"), (92, torch.float64, "list"), (93, torch.float16, "list")):
        case, z, labels, y = soft_case(seed, 3, 5, 11, T=2.0, progress=0.3)
        z = z.to(device=device, dtype=dtype)
        y = y.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        codes = list(timm_dcl.encode_gates(case.gates))
        parts = [zn.clone() for zn in z] if form == "list" else [z.clone()]
        grad_parts = [p.detach().clone().requires_grad_(True) for p in parts]
        torch.library.opcheck(loss, (grad_parts, y, codes, case.T, case.progress, None))
        torch.library.opcheck(fwd, (parts, y, codes, case.T, case.progress, None))
        losses, stats = fwd(parts, y, codes, case.T, case.progress, None)
        grad_losses = torch.randn(losses.shape, dtype=losses.dtype, device=device)
        torch.library.opcheck(bwd, (grad_losses, parts, y, stats, codes, case.T, case.progress, None))


def test_soft_compile_fullgraph(device):
    needs_kernel(device)
    gates = [["through", "correct"], ["linear", "through"]]

    def step(z, y):
        return timm_dcl.ktg_loss(z, y, gates, temperature=2.0, progress=0.4)

    torch.compiler.reset()
    _, z, labels, y = soft_case(94, 2, 8, 10)
    z, y = z.float().to(device), y.float().to(device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        zz = z.clone().requires_grad_(True)
        losses = fn(zz, y)
        losses.sum().backward()
        results.append((losses.detach(), zz.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [ktg_loss, ktg_loss_reference], ids=["fused", "reference"])
def test_bad_soft_targets(fn):
    z = torch.randn(2, 4, 5)
    gates = [["through"] * 2] * 2
    with pytest.raises(ValueError, match=r"soft labels .*must be \[B, C\] = \(4, 5\).*got shape \(4, 6\)"):
        fn(z, torch.rand(4, 6), gates)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor .* or a floating tensor \[B, C\]"):
        fn(z, torch.rand(4), gates)
    with pytest.raises(ValueError, match="labels are on meta but logits are on cpu"):
        fn(z, torch.rand(4, 5, device="meta"), gates)
