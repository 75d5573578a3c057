"""The fused KTG loss's host path: progress as a tensor, gradients read with their
strides, the logits as a list read in place, no-grad modes, gate encoding, M > 8.

Helpers come from test_ktg_loss.py (same folder, on sys.path under pytest).
"""
from __future__ import annotations

import pytest
import torch

from test_ktg_loss import check_parity, loss_and_grad, make_case, needs_kernel
from timm_dcl import KTGLoss, ktg_loss, ktg_loss_reference

LINEAR_GATES = [["through", "linear", "correct"], ["linear", "through", "cutoff"], ["through", "correct", "linear"]]


# ----------------------------------------------------------------------------- progress

def test_progress_tensor_equals_float(device):
    case, z, y = make_case(201, 3, 9, 13, T=2.0, progress=0.375, gates=LINEAR_GATES)
    z, y = z.to(device), y.to(device)
    weights = torch.linspace(0.5, 1.5, 3, dtype=torch.float64, device=device)
    want, want_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, 0.375, weights)
    other, _ = loss_and_grad(ktg_loss, z, y, case.gates, case.T, 0.9, weights)
    assert not torch.allclose(want, other)  # the progress matters for these gates
    # 0.375 is exact in float32 too, so every form gives the very same numbers.
    forms = [torch.tensor(0.375, dtype=torch.float64), torch.tensor(0.375), torch.tensor([0.375]),
             torch.tensor(0.375, dtype=torch.float64, device=device), torch.tensor(0.375, dtype=torch.float16)]
    for p in forms:
        got, got_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, p, weights)
        assert torch.equal(got, want) and torch.equal(got_grad, want_grad), p
        zz = z.clone().requires_grad_(True)
        module = KTGLoss(case.gates, temperature=case.T)(zz, y, progress=p)
        assert torch.equal(module.detach(), want)


@pytest.mark.parametrize("progress, exc, match", [
    (torch.tensor([0.1, 0.2]), ValueError, "progress must be a number or a tensor of one element"),
    (torch.tensor(1), TypeError, "progress must be a floating tensor"),
    (torch.tensor(0.5, device="meta"), ValueError, "progress is on meta but logits are on cpu"),
    (float("nan"), ValueError, "progress must be finite"),
])
def test_bad_progress(progress, exc, match):
    needs_kernel(torch.device("cpu"))
    z, y = torch.randn(3, 4, 5), torch.tensor([0, 4, 2, 1])
    with pytest.raises(exc, match=match):
        ktg_loss(z, y, LINEAR_GATES, progress=progress)
    with pytest.raises(exc, match=match):
        KTGLoss(LINEAR_GATES)(list(z), y, progress=progress)


# ----------------------------------------------------------------------------- gradients

def test_strided_and_expanded_grad_losses(device):
    """The backward reads grad_losses with its strides (no copy): strided and stride-0
    gradients give what their contiguous copies give."""
    case, z, y = make_case(202, 4, 6, 11, T=1.0, progress=0.5)
    z, y = z.float().to(device).requires_grad_(True), y.to(device)
    losses = ktg_loss(z, y, case.gates, temperature=case.T, progress=case.progress)
    base = torch.randn(8, generator=torch.Generator().manual_seed(0)).to(device)
    for grad_out in (base[::2], torch.tensor(1.5, device=device).expand(4)):
        assert not grad_out.is_contiguous()
        (got,) = torch.autograd.grad(losses, z, grad_out, retain_graph=True)
        (want,) = torch.autograd.grad(losses, z, grad_out.contiguous(), retain_graph=True)
        assert torch.equal(got, want)


def test_list_rows_read_in_place_or_copied(device):
    """List parts with a row stride (slices of wider outputs) are read in place; parts
    without unit class stride are copied; both equal the stacked tensor's results."""
    case, z, y = make_case(203, 3, 7, 9, T=2.0, progress=0.25)
    z, y = z.float().to(device), y.to(device)
    weights = torch.tensor([1.0, -0.5, 2.0], device=device)
    want, want_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, case.progress, weights)
    wide = torch.cat([z[0], torch.full_like(z[0], float("nan"))], dim=1)[:, :9]   # row stride 18
    transposed = z[1].t().contiguous().t()                                          # class stride 7
    parts = [wide.detach().requires_grad_(True), transposed.detach().requires_grad_(True),
             z[2].clone().requires_grad_(True)]
    assert parts[0].stride() == (18, 1) and parts[1].stride(1) != 1
    losses = ktg_loss(tuple(parts), y, case.gates, temperature=case.T, progress=case.progress)
    (losses * weights).sum().backward()
    torch.testing.assert_close(losses.detach(), want, rtol=0, atol=0)
    for n, part in enumerate(parts):
        torch.testing.assert_close(part.grad, want_grad[n], rtol=0, atol=0)


def test_no_grad_and_inference_mode(device):
    case, z, y = make_case(204, 3, 5, 8, T=2.0)
    z, y = z.float().to(device), y.to(device)
    want = ktg_loss(z.clone().requires_grad_(True), y, case.gates, temperature=2.0).detach()
    with torch.no_grad():
        got = ktg_loss(z.clone().requires_grad_(True), y, case.gates, temperature=2.0)
    assert not got.requires_grad and torch.equal(got, want)
    with torch.inference_mode():
        got = ktg_loss(z.clone(), y, case.gates, temperature=2.0)
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- gates

def test_gate_names_are_reencoded_after_mutation():
    """Gate names are encoded once and cached by value: changing the matrix in place
    between calls changes the loss."""
    case, z, y = make_case(205, 2, 6, 5, progress=0.5)
    z = z.float()
    gates = [["through", "linear"], ["correct", "through"]]
    first = ktg_loss(z, y, gates, progress=0.5)
    gates[0][1] = "cutoff"
    second = ktg_loss(z, y, gates, progress=0.5)
    torch.testing.assert_close(second, ktg_loss_reference(z, y, gates, progress=0.5), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second)


def test_gate_cache_does_not_mask_bad_codes():
    z, y = torch.randn(2, 4, 5), torch.tensor([0, 4, 2, 1])
    ktg_loss(z, y, [[0, 1], [1, 0]])
    ktg_loss(z, y, [["through", "cutoff"], ["cutoff", "through"]])
    with pytest.raises(TypeError, match="got a bool"):
        ktg_loss(z, y, [[0, True], [True, 0]])
    with pytest.raises(TypeError, match="got float"):
        ktg_loss(z, y, [[0, 1.0], [1, 0]])


# ----------------------------------------------------------------------------- many nodes

@pytest.mark.parametrize("M", [9, 12, 16])
def test_parity_many_nodes(device, M):
    """Above 8 nodes the CUDA kernels take their one-pass-per-source layout."""
    for i, (B, C) in enumerate(((3, 37), (5, 300))):
        case, z, y = make_case(300 + 10 * M + i, M, B, C, T=(1.0, 2.0)[i], progress=0.7)
        check_parity(case, z, y, torch.float32, device)
    case, z, y = make_case(390 + M, M, 4, 33, T=3.0, progress=0.2)
    check_parity(case, z, y, torch.float64, device)


def test_python_autograd_function_matches_op(device):
    """KTGLossFunction (the internal ops under a Python autograd.Function) agrees with
    ktg_loss, whose autograd is registered in C++."""
    needs_kernel(device)
    from timm_dcl import KTGLossFunction, encode_gates
    case, z, y = make_case(206, 3, 6, 9, T=2.0, progress=0.4, gates=LINEAR_GATES)
    z, y = z.float().to(device), y.to(device)
    weights = torch.tensor([1.0, -2.0, 0.5], device=device)
    want, want_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, case.progress, weights)
    zz = z.clone().requires_grad_(True)
    losses, stats = KTGLossFunction.apply(zz, y, encode_gates(case.gates), case.T, case.progress)
    (losses * weights).sum().backward()
    assert not stats.requires_grad
    assert torch.equal(losses.detach(), want) and torch.equal(zz.grad, want_grad)
