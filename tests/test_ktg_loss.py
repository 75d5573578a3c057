"""The fused KTG loss (``timm_dcl.ktg_loss``) against its reference and SPEC §2.

Where the compiled kernels are not built, ``ktg_loss`` runs the reference: the same
tests then hold the fallback path to the same contract.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

import timm_dcl
from timm_dcl import MAX_NODES, KTGLoss, kernels_available, ktg_loss, ktg_loss_reference
from timm_dcl.gates import GATE_NAMES, Gate

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
HALF = (torch.float16, torch.bfloat16)

# Relative tolerances (values, gradients) against the reference. Half inputs are
# compared with a float32 reference of the upcast inputs; their gradients come back
# rounded to the input dtype, hence the dtype's epsilon.
RTOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-4, 2e-3),
    torch.bfloat16: (1e-4, 1.6e-2),
}


# ----------------------------------------------------------------------------- helpers

@dataclass
class Case:
    """One random loss evaluation; ``str(case)`` is enough to rebuild it."""
    seed: int
    M: int
    B: int
    C: int
    T: float
    progress: float
    gates: list

    def __str__(self) -> str:
        return (f"Case(seed={self.seed}, M={self.M}, B={self.B}, C={self.C}, T={self.T}, "
                f"progress={self.progress}, gates={self.gates})")


def random_gates(gen: torch.Generator, M: int) -> list[list[str]]:
    codes = torch.randint(len(GATE_NAMES), (M, M), generator=gen).tolist()
    if M >= 2:
        codes[0][M - 1] = Gate.CORRECT  # the correct gate's mask always matters somewhere
        codes[M - 1][0] = Gate.LINEAR
    return [[GATE_NAMES[c] for c in row] for row in codes]


def right_mask(gen: torch.Generator, M: int, B: int) -> torch.Tensor:
    """Which node is right on which sample: mixed within every node when B ≥ 2."""
    right = torch.rand(M, B, generator=gen) < 0.5
    if B >= 2:
        right[:, 0], right[:, 1] = True, False
    else:
        right[:, 0] = torch.arange(M) % 2 == 0
    return right


def make_logits(gen: torch.Generator, labels: torch.Tensor, right: torch.Tensor, C: int,
                scale: float = 2.0) -> torch.Tensor:
    """float64 logits [M, B, C] whose argmax is the label exactly where ``right``.

    The winning class sits 1 to 2 above every other logit, so argmax (the correct
    gate's mask) is stable under finite differences and half-precision rounding.
    """
    M, B = right.shape
    z = torch.randn(M, B, C, generator=gen, dtype=torch.float64) * scale
    other = (labels + torch.randint(1, C, (M, B), generator=gen)) % C
    winner = torch.where(right, labels.expand(M, B), other)
    top = z.amax(-1) + 1 + torch.rand(M, B, generator=gen, dtype=torch.float64)
    return z.scatter_(-1, winner.unsqueeze(-1), top.unsqueeze(-1))


def make_case(seed: int, M: int, B: int, C: int, T: float = 1.0, progress: float = 0.5,
              gates=None) -> tuple[Case, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(C, (B,), generator=gen)
    right = right_mask(gen, M, B)
    z = make_logits(gen, labels, right, C)
    case = Case(seed, M, B, C, T, progress, gates if gates is not None else random_gates(gen, M))
    return case, z, labels


def assert_mixed_correct_mask(z: torch.Tensor, labels: torch.Tensor) -> None:
    correct = z.argmax(-1) == labels
    if z.shape[1] >= 2:
        assert correct.any(1).all() and (~correct).any(1).all(), "every node's correct mask must be mixed"
    elif z.shape[0] >= 2:
        assert correct.any() and (~correct).any(), "the correct masks must be mixed across nodes"


def loss_and_grad(fn, z: torch.Tensor, labels: torch.Tensor, gates, T: float, progress: float,
                  weights: torch.Tensor):
    """Losses and d(Σ_t w_t L_t)/dz of ``fn`` at ``z``."""
    z = z.detach().clone().requires_grad_(True)
    losses = fn(z, labels, gates, temperature=T, progress=progress)
    if not losses.requires_grad:  # every gate cut off: the reference builds no graph
        return losses, torch.zeros_like(z)
    (losses * weights.to(losses.dtype)).sum().backward()
    return losses.detach(), z.grad


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Elementwise relative closeness, with an absolute floor of rtol × the largest |expected|."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(float(expected.abs().max()), 1e-30) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def gradcheck_per_target(z: torch.Tensor, labels: torch.Tensor, gates, T: float, progress: float) -> None:
    """gradcheck of z_t ↦ L_t for every t, the other nodes' logits held constant.

    The op detaches its sources, so its gradient is the derivative of each L_t with
    respect to its own z_t only (SPEC §2), not the derivative of Σ_t L_t.
    """
    M = z.shape[0]
    for t in range(M):
        def loss_t(zt, t=t):
            full = torch.cat([z[:t], zt.unsqueeze(0), z[t + 1:]])
            return ktg_loss(full, labels, gates, temperature=T, progress=progress)[t]

        zt = z[t].detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(loss_t, (zt,), eps=1e-6, atol=1e-8, rtol=1e-6), f"target {t}"


def spec_losses(z: torch.Tensor, labels: torch.Tensor, gates: list[list[str]], T: float,
                progress: float) -> torch.Tensor:
    """SPEC §2 sample by sample in float64, independent of the package's reference."""
    M, B, _ = z.shape
    z = z.double()
    out = torch.zeros(M, dtype=torch.float64)
    for t in range(M):
        for s in range(M):
            gate = gates[t][s]
            weight = {"through": 1.0, "cutoff": 0.0, "linear": progress, "correct": 1.0}[gate]
            for b in range(B):
                if s == t:
                    edge = -torch.log_softmax(z[t, b], 0)[labels[b]]
                else:
                    log_p = torch.log_softmax(z[s, b] / T, 0)
                    log_q = torch.log_softmax(z[t, b] / T, 0)
                    edge = T * T * (log_p.exp() * (log_p - log_q)).sum()
                    if gate == "correct":
                        # first maximal index: ties go to the lowest class
                        top = max(range(z.shape[2]), key=lambda c: (z[s, b, c].item(), -c))
                        edge = edge * (top == labels[b].item())
                out[t] += weight * edge / B
    return out


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("layout", ["everywhere", "one_edge"])
@pytest.mark.parametrize("gate", GATE_NAMES)
def test_gradcheck_each_gate_alone(device, gate, layout):
    M, B, C = 3, 3, 5
    if layout == "everywhere":
        gates = [[gate] * M for _ in range(M)]
    else:  # one knowledge edge and one label edge carry the gate, all else cut off
        gates = [["cutoff"] * M for _ in range(M)]
        gates[0][1] = gates[2][2] = gate
    _, z, y = make_case(10, M, B, C, gates=gates)
    assert_mixed_correct_mask(z, y)
    gradcheck_per_target(z.to(device), y.to(device), gates, T=2.0, progress=0.37)


@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_gradcheck_mixed_gates(device, M, T):
    case, z, y = make_case(100 + M, M, 4, 6, T=T, progress=0.61)
    assert_mixed_correct_mask(z, y)
    gradcheck_per_target(z.to(device), y.to(device), case.gates, case.T, case.progress)


# ----------------------------------------------------------------------------- parity

BATCHES = (1, 3, 64, 130)
CLASSES = (2, 10, 37, 100, 1000)


def parity_cases(n: int, first_seed: int):
    """n cases covering every (B, C) pair of the grid for n ≥ 20, M from 1 to 8."""
    for i in range(n):
        B, C = BATCHES[i % 4], CLASSES[(i // 4) % 5]
        M = 1 + (3 * i + i // 8) % 8
        if B * C * M > 300_000:  # keeps the run short; M = 8 with B·C = 130k is still in
            M = max(2, 300_000 // (B * C))
        T = (1.0, 2.0, 4.0)[i % 3]
        progress = (0.0, 1.0, 0.25, 0.8)[i % 4]
        yield make_case(first_seed + i, M, B, C, T, progress)


def check_parity(case: Case, z64: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, device) -> None:
    z = z64.to(device=device, dtype=dtype)
    y = y.to(device)
    # A half-precision input is compared with the float32 reference of its upcast value.
    z_ref = z.float() if dtype in HALF else z
    weights = torch.randn(case.M, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    weights = weights.to(device)
    assert_mixed_correct_mask(z_ref.cpu(), y.cpu())

    got, got_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, case.progress, weights)
    want, want_grad = loss_and_grad(ktg_loss_reference, z_ref, y, case.gates, case.T, case.progress, weights)
    rtol_value, rtol_grad = RTOL[dtype]
    assert got.dtype == want.dtype and got_grad.dtype == dtype and got_grad.shape == z.shape
    assert_scaled_close(got, want, rtol_value, f"losses of {case} in {dtype}")
    assert_scaled_close(got_grad, want_grad, rtol_grad, f"gradient of {case} in {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_with_reference(device, dtype):
    for case, z, y in parity_cases(24, first_seed=1000):
        check_parity(case, z, y, dtype, device)


@pytest.mark.parametrize("dtype", HALF)
def test_parity_half_precision(device, dtype):
    for case, z, y in parity_cases(20, first_seed=2000):
        check_parity(case, z, y, dtype, device)


def test_reference_matches_spec():
    """The reference itself against a per-sample transcription of SPEC §2 (all gates, T ≠ 1)."""
    gates = [["through", "correct", "linear"], ["correct", "linear", "cutoff"], ["cutoff", "through", "correct"]]
    case, z, y = make_case(7, 3, 5, 7, T=2.5, progress=0.3, gates=gates)
    assert_mixed_correct_mask(z, y)
    want = spec_losses(z, y, gates, case.T, case.progress)
    for fn in (ktg_loss_reference, ktg_loss):
        got = fn(z, y, gates, temperature=case.T, progress=case.progress)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_correct_gate_ties_go_to_lowest_class(device):
    """A source with tied maxima is "right" only when the label is the lowest tied class."""
    z = torch.randn(2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z[1] = 0.0
    z[1, :, 2] = z[1, :, 4] = 1.0  # classes 2 and 4 tie on every sample
    y = torch.tensor([0, 2, 4, 2])  # source right only on samples 1 and 3
    gates = [["cutoff", "correct"], ["cutoff", "cutoff"]]
    want = spec_losses(z, y, gates, 1.0, 1.0)
    got = ktg_loss(z.to(device), y.to(device), gates)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-14)
    z32 = z.float().to(device)
    torch.testing.assert_close(ktg_loss(z32, y.to(device), gates),
                               ktg_loss_reference(z32, y.to(device), gates), rtol=1e-6, atol=1e-7)


def test_sources_get_no_gradient_from_other_nodes(device):
    """d L_t / d z_s = 0 for s ≠ t: a node is only taught, never pulled towards its pupils."""
    gates = [["through"] * 3 for _ in range(3)]
    _, z, y = make_case(5, 3, 8, 10)
    z = z.to(device).requires_grad_(True)
    y = y.to(device)
    ktg_loss(z, y, gates, temperature=2.0)[1].backward()
    assert torch.count_nonzero(z.grad[1]) > 0
    assert torch.count_nonzero(z.grad[0]) == 0 and torch.count_nonzero(z.grad[2]) == 0


def test_cutoff_row_is_zero_without_gradient(device):
    gates = [["through", "linear"], ["cutoff", "cutoff"]]
    _, z, y = make_case(6, 2, 8, 10)
    z = z.float().to(device).requires_grad_(True)
    losses = ktg_loss(z, y.to(device), gates, progress=0.5)
    assert losses[1].item() == 0.0
    losses.sum().backward()
    assert torch.count_nonzero(z.grad[1]) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_dtypes(device, dtype):
    _, z, y = make_case(8, 2, 3, 4)
    z = z.to(device=device, dtype=dtype).requires_grad_(True)
    losses = ktg_loss(z, y.to(device), [["through"] * 2] * 2)
    assert losses.shape == (2,) and losses.device == z.device
    assert losses.dtype == (torch.float32 if dtype in HALF else dtype)
    losses.sum().backward()
    assert z.grad.dtype == dtype


def test_list_input_form(device):
    case, z, y = make_case(11, 4, 9, 13, T=2.0, progress=0.4)
    z, y = z.float().to(device), y.to(device)
    weights = torch.randn(4, generator=torch.Generator().manual_seed(0)).to(device)
    stacked, stacked_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, case.progress, weights)

    parts = [zn.clone().requires_grad_(True) for zn in z]
    losses = ktg_loss(parts, y, case.gates, temperature=case.T, progress=case.progress)
    (losses * weights).sum().backward()
    assert torch.equal(losses.detach(), stacked)
    for n, part in enumerate(parts):
        assert torch.equal(part.grad, stacked_grad[n])


def test_module_equals_function(device):
    for seed, M in ((21, 1), (22, 3), (23, 6)):
        case, z, y = make_case(seed, M, 7, 11, T=3.0)
        z, y = z.float().to(device), y.to(device)
        loss_fn = KTGLoss(case.gates, temperature=case.T)
        weights = torch.randn(M, generator=torch.Generator().manual_seed(seed)).to(device)
        want, want_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, 0.3, weights)
        zm = z.clone().requires_grad_(True)
        got = loss_fn(zm, y, progress=0.3)
        (got * weights).sum().backward()
        assert torch.equal(got.detach(), want) and torch.equal(zm.grad, want_grad)
    assert "temperature=3.0" in repr(loss_fn)


def test_noncontiguous_and_int32_labels(device):
    case, z, y = make_case(31, 3, 6, 9, T=2.0)
    z = z.to(device)
    strided = z.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [B, M, C] memory
    assert not strided.is_contiguous()
    want = ktg_loss_reference(z, y.to(device), case.gates, temperature=2.0)
    got = ktg_loss(strided, y.to(device=device, dtype=torch.int32), case.gates, temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- extremes

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits(device, dtype):
    gen = torch.Generator().manual_seed(4)
    gates = [["through", "correct", "linear"], ["through", "through", "correct"], ["linear", "through", "through"]]
    signs = torch.randint(2, (3, 16, 10), generator=gen, dtype=torch.float64) * 2 - 1
    cases = [
        (signs * 1e4, torch.randint(10, (16,), generator=gen), 1.0),                   # exactly ±1e4
        (torch.randn(3, 8, 1000, generator=gen, dtype=torch.float64) * 1e4,
         torch.randint(1000, (8,), generator=gen), 2.0),                                # 1e4 scale, C = 1000
    ]
    for z64, y, T in cases:
        z = z64.to(device=device, dtype=dtype)
        y = y.to(device)
        weights = torch.randn(3, generator=gen, dtype=torch.float64).to(device)
        got, got_grad = loss_and_grad(ktg_loss, z, y, gates, T, 0.5, weights)
        # Truth: the float64 reference of the very values the op saw.
        want, want_grad = loss_and_grad(ktg_loss_reference, z.double(), y, gates, T, 0.5, weights)
        assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
        assert float(want.abs().max()) > 1e3  # the case really is extreme
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
        assert_scaled_close(got, want, rtol, f"losses at ±1e4, T={T}, {dtype}")
        assert_scaled_close(got_grad, want_grad, rtol, f"gradient at ±1e4, T={T}, {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_class_count(device, dtype):
    case, z, y = make_case(41, 2, 2, 32768, T=2.0, progress=0.7,
                           gates=[["through", "correct"], ["linear", "through"]])
    check_parity(case, z, y, dtype, device)


def test_more_nodes_than_kernel_limit_falls_back(device):
    M = MAX_NODES + 1
    case, z, y = make_case(51, M, 3, 5, T=2.0, progress=0.5)
    weights = torch.randn(M, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z, y, weights = z.to(device), y.to(device), weights.to(device)
    got, got_grad = loss_and_grad(ktg_loss, z, y, case.gates, case.T, case.progress, weights)
    want, want_grad = loss_and_grad(ktg_loss_reference, z, y, case.gates, case.T, case.progress, weights)
    assert got.shape == (M,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-14)
    out = KTGLoss(case.gates, temperature=case.T)(z, y, progress=case.progress)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- determinism

def fwd_bwd(z: torch.Tensor, y: torch.Tensor, gates, T: float = 2.0, progress: float = 0.5):
    z = z.detach().clone().requires_grad_(True)
    losses = ktg_loss(z, y, gates, temperature=T, progress=progress)
    losses.sum().backward()
    return losses.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic(device, dtype):
    case, z, y = make_case(61, 5, 130, 1000)
    z, y = z.to(device=device, dtype=dtype), y.to(device)
    first, second = fwd_bwd(z, y, case.gates), fwd_bwd(z, y, case.gates)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_thread_count_does_not_change_results():
    case, z, y = make_case(62, 5, 130, 1000)
    z = z.float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fwd_bwd(z, y, case.gates)
        torch.set_num_threads(2)
        two = fwd_bwd(z, y, case.gates)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# ----------------------------------------------------------------------------- kernels

def test_kernels_available():
    try:
        import timm_dcl._C  # noqa: F401
        built = True
    except ImportError:  # not built; the package may still have JIT-compiled the kernels
        built = False
    available = kernels_available()
    assert isinstance(available, set) and available <= {"cpu", "cuda"}
    assert kernels_available() is not kernels_available()  # callers get a copy
    if built:
        assert "cpu" in available
        if HAS_CUDA:
            assert "cuda" in available
    # Devices are listed exactly when the ops are registered (from _C or the JIT build).
    assert bool(available) == hasattr(torch.ops.timm_dcl, "ktg_loss")


@pytest.mark.skipif(os.environ.get("TIMM_DCL_ALLOW_FALLBACK") == "1",
                    reason="TIMM_DCL_ALLOW_FALLBACK=1: running without the compiled kernels on purpose")
def test_compiled_cpu_kernels_are_present():
    """Without the compiled CPU kernels ``ktg_loss`` is the reference, and every parity test
    here would compare the reference with itself: fail loudly instead (set
    TIMM_DCL_ALLOW_FALLBACK=1 to test the fallback path deliberately)."""
    assert "cpu" in kernels_available(), (
        "the compiled KTG loss kernels are not loaded: build them with "
        "`pip install -e . --no-build-isolation`")


def needs_kernel(device: torch.device) -> None:
    if device.type not in kernels_available():
        pytest.skip(f"no compiled {device.type} kernel: kernels_available() = {kernels_available()}")


def test_opcheck(device):
    needs_kernel(device)
    loss = torch.ops.timm_dcl.ktg_loss.default
    fwd = torch.ops.timm_dcl.ktg_loss_forward.default
    bwd = torch.ops.timm_dcl.ktg_loss_backward.default
    samples = [
        make_case(71, 3, 4, 10, T=2.0, progress=0.3) + (torch.float32, True, "tensor"),
        make_case(72, 2, 5, 7, T=1.0, progress=1.0) + (torch.float64, False, "list"),
        make_case(73, 4, 3, 37, T=4.0, progress=0.0) + (torch.float16, True, "list"),
        make_case(74, 3, 6, 9, T=1.5, progress=0.6) + (torch.float64, True, "progress_tensor"),
    ]
    for case, z, y, dtype, requires_grad, form in samples:
        z = z.to(device=device, dtype=dtype)
        y = y.to(device)
        codes = list(timm_dcl.encode_gates(case.gates))
        parts = [zn.clone() for zn in z] if form == "list" else [z.clone()]
        pt = torch.tensor(case.progress, dtype=torch.float64, device=device) if form == "progress_tensor" else None
        # The public op with its C++ autograd (gradients checked against the fake and AOT paths).
        grad_parts = [p.detach().clone().requires_grad_(requires_grad) for p in parts]
        torch.library.opcheck(loss, (grad_parts, y, codes, case.T, case.progress, pt))
        torch.library.opcheck(fwd, (parts, y, codes, case.T, case.progress, pt))
        losses, stats = fwd(parts, y, codes, case.T, case.progress, pt)
        assert stats.shape == (case.M, z.shape[1], 4)
        grad_losses = torch.randn(losses.shape, dtype=losses.dtype, device=device)
        torch.library.opcheck(bwd, (grad_losses, parts, y, stats, codes, case.T, case.progress, pt))


# ----------------------------------------------------------------------------- torch.compile

def check_compiled(compiled, eager, z: torch.Tensor, y: torch.Tensor, rtol: float) -> None:
    weights = torch.linspace(0.5, 1.5, z.shape[0], dtype=z.dtype, device=z.device)
    results = []
    for fn in (eager, compiled):
        zz = z.clone().requires_grad_(True)
        losses = fn(zz, y)
        (losses * weights).sum().backward()
        results.append((losses.detach(), zz.grad))
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)
    torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_function_fullgraph(device, backend):
    gates = [["through", "correct", "linear"], ["cutoff", "through", "through"], ["correct", "linear", "through"]]

    def step(z, y):
        return timm_dcl.ktg_loss(z, y, gates, temperature=2.0, progress=0.4)

    torch.compiler.reset()
    _, z, y = make_case(81, 3, 8, 10)
    check_compiled(torch.compile(step, fullgraph=True, backend=backend), step,
                   z.float().to(device), y.to(device), rtol=1e-6)


def test_compile_module_fullgraph(device):
    loss_fn = KTGLoss([["through", "linear"], ["correct", "through"]], temperature=3.0)

    def step(z, y):
        return loss_fn(z, y, progress=0.25)

    torch.compiler.reset()
    _, z, y = make_case(82, 2, 8, 10)
    check_compiled(torch.compile(step, fullgraph=True, backend="aot_eager"), step,
                   z.float().to(device), y.to(device), rtol=1e-6)


def test_compile_inductor():
    """Inductor (one compile: it is slow on a small CPU) around the op inside a bigger graph."""
    gates = [["through", "through"], ["correct", "through"]]

    def step(z, y):
        return timm_dcl.ktg_loss(torch.tanh(z) * 4.0, y, gates, temperature=2.0).sum().reshape(1)

    torch.compiler.reset()
    _, z, y = make_case(83, 2, 8, 10)
    check_compiled(torch.compile(step, fullgraph=True), step, z.float(), y, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input

M3 = [["through"] * 3 for _ in range(3)]


def good(**overrides):
    """Valid arguments for M = 3, B = 4, C = 5, with some replaced."""
    gen = torch.Generator().manual_seed(0)
    args = dict(logits=torch.randn(3, 4, 5, generator=gen), labels=torch.tensor([0, 4, 2, 1]), gates=M3,
                temperature=1.0, progress=1.0)
    args.update(overrides)
    return args


BAD_INPUTS = {
    "negative_label": (good(labels=torch.tensor([0, -1, 2, 1])), IndexError, r"label -1\b.*outside \[0, C\)"),
    "label_equal_C": (good(labels=torch.tensor([0, 5, 2, 1])), IndexError, r"label 5\b.*outside \[0, C\)"),
    "float_labels": (good(labels=torch.tensor([0.0, 1.0, 2.0, 1.0])), TypeError, "labels must be an integer"),
    "soft_labels_wrong_shape": (good(labels=torch.rand(4, 3)), ValueError, r"soft labels .*must be \[B, C\] = \(4, 5\)"),
    "labels_wrong_length": (good(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must be \[B\] with B = 4"),
    "labels_2d": (good(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError, r"labels must be \[B\]"),
    "gates_too_few_rows": (good(gates=M3[:2]), ValueError, "gates has 2 rows but the graph has 3 nodes"),
    "gates_short_row": (good(gates=[M3[0], ["through"] * 2, M3[2]]), ValueError, "row 1 has 2 entries"),
    "unknown_gate": (good(gates=[M3[0], ["through", "throu", "cutoff"], M3[2]]), ValueError,
                     r"unknown gate 'throu' at gates\[1\]\[1\]"),
    "gate_code_out_of_range": (good(gates=torch.full((3, 3), 7)), ValueError, "gate code 7"),
    "list_batch_sizes_differ": (good(logits=[torch.randn(4, 5), torch.randn(3, 5), torch.randn(4, 5)]),
                                ValueError, "batch sizes differ"),
    "list_class_counts_differ": (good(logits=[torch.randn(4, 5), torch.randn(4, 6), torch.randn(4, 5)]),
                                 ValueError, "class counts differ"),
    "logits_2d": (good(logits=torch.randn(4, 5)), ValueError, r"logits must be a tensor \[M, B, C\]"),
    "logits_4d": (good(logits=torch.randn(3, 4, 5, 1)), ValueError, r"logits must be a tensor \[M, B, C\]"),
    "integer_logits": (good(logits=torch.zeros(3, 4, 5, dtype=torch.int64)), TypeError,
                       "logits must be float16, bfloat16, float32 or float64"),
    "logits_not_tensor": (good(logits="logits"), TypeError, "logits must be a tensor"),
    "temperature_zero": (good(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    "temperature_negative": (good(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    "temperature_nan": (good(temperature=math.nan), ValueError, "temperature must be a finite number > 0"),
    "progress_nan": (good(progress=math.nan), ValueError, "progress must be finite"),
    "list_device_mismatch": (good(logits=[torch.randn(4, 5), torch.randn(4, 5, device="meta"), torch.randn(4, 5)]),
                             ValueError, "logits.1. is on meta but logits.0. is on cpu"),
    "labels_on_other_device": (good(labels=torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
                               "labels are on meta but logits are on cpu"),
    "empty_batch": (good(logits=torch.randn(3, 0, 5), labels=torch.zeros(0, dtype=torch.long)), ValueError,
                    r"empty batch \(B = 0\)"),
}


@pytest.mark.parametrize("fn", [ktg_loss, ktg_loss_reference], ids=["fused", "reference"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input(fn, name):
    args, exc, match = BAD_INPUTS[name]
    args = dict(args)
    with pytest.raises(exc, match=match):
        fn(args.pop("logits"), args.pop("labels"), args.pop("gates"), **args)


def test_bad_input_module():
    with pytest.raises(ValueError, match="unknown gate"):
        KTGLoss([["through", "nope"], ["through", "through"]])
    with pytest.raises(ValueError, match="temperature"):
        KTGLoss(M3, temperature=0.0)
    loss_fn = KTGLoss(M3)
    with pytest.raises(ValueError, match="this loss has 3 nodes but got logits of 2"):
        loss_fn(torch.randn(2, 4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(IndexError, match=r"label 5\b.*outside \[0, C\)"):
        loss_fn(torch.randn(3, 4, 5), torch.tensor([0, 5, 2, 1]))
    with pytest.raises(ValueError, match="progress must be finite"):
        loss_fn(torch.randn(3, 4, 5), torch.zeros(4, dtype=torch.long), progress=math.inf)


@needs_cuda
@pytest.mark.parametrize("fn", [ktg_loss, ktg_loss_reference], ids=["fused", "reference"])
def test_cuda_device_mismatch(fn):
    z = torch.randn(3, 4, 5, device="cuda")
    with pytest.raises(ValueError, match="labels are on cpu but logits are on cuda"):
        fn(z, torch.zeros(4, dtype=torch.long), M3)
    with pytest.raises(ValueError, match=r"logits\[1\] is on cpu but logits\[0\] is on cuda"):
        fn([z[0], z[1].cpu(), z[2]], torch.zeros(4, dtype=torch.long, device="cuda"), M3)


# ----------------------------------------------------------------------------- CUDA only
# (more in test_ktg_loss_cuda.py: streams, a second device, one launch each way, no sync)

@needs_cuda
def test_cuda_out_of_range_label_gives_nan():
    needs_kernel(torch.device("cuda"))
    z = torch.randn(3, 4, 5, device="cuda", requires_grad=True)
    for bad in (5, -1):
        y = torch.tensor([0, bad, 2, 1], device="cuda")
        losses = ktg_loss(z, y, M3)
        losses.sum().backward()
        torch.cuda.synchronize()  # no device-side assert
        assert torch.isnan(losses).all(), losses
