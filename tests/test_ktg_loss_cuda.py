"""CUDA-only behaviour of the fused KTG loss: streams, devices, launches, syncs.

Skipped without a GPU; benchmarks/gpu_check.sh runs them on a lent one. Parity at
M = 9, 12 and 16 (the kernels' layout above 8 nodes) is test_ktg_loss_host.py's
test_parity_many_nodes, which runs on every device.
"""
from __future__ import annotations

import pytest
import torch

from test_ktg_loss import make_case, needs_kernel
from timm_dcl import KTGLoss, ktg_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def fwd_bwd(z, y, gates, T=2.0, progress=0.5):
    z = z.detach().clone().requires_grad_(True)
    losses = ktg_loss(z, y, gates, temperature=T, progress=progress)
    (losses * torch.linspace(0.5, 1.5, z.shape[0], device=z.device)).sum().backward()
    return losses.detach(), z.grad


def test_side_stream_matches_default_stream():
    """The kernels run on the caller's current stream: work queued on a side stream
    (behind a long producer there) gives the default stream's results."""
    needs_kernel(torch.device("cuda"))
    case, z, y = make_case(501, 5, 256, 1000)
    z, y = z.float().cuda(), y.cuda()
    want = fwd_bwd(z, y, case.gates)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):
            big = big @ big.t() / 4096  # keeps the side stream busy before the loss
        zs = z * 1.0
        got = fwd_bwd(zs, y, case.gates)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1."""
    needs_kernel(torch.device("cuda"))
    case, z, y = make_case(502, 4, 64, 100)
    want = fwd_bwd(z.float().to("cuda:0"), y.to("cuda:0"), case.gates)
    with torch.cuda.device(0):
        got = fwd_bwd(z.float().to("cuda:1"), y.to("cuda:1"), case.gates)
    assert got[0].device == torch.device("cuda:1") and got[1].device == torch.device("cuda:1")
    assert torch.equal(got[0].cpu(), want[0].cpu()) and torch.equal(got[1].cpu(), want[1].cpu())


@pytest.mark.parametrize("form", ["tensor", "list", "device_progress"])
def test_one_kernel_each_way(form):
    """One launch forward, one backward, whatever the form of the inputs: a list is not
    stacked, a progress tensor on the device is read by the kernel."""
    needs_kernel(torch.device("cuda"))
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    case, z, y = make_case(503, 5, 64, 100, T=2.0)
    z, y = z.float().cuda(), y.cuda()
    progress = torch.tensor(0.3, device="cuda") if form == "device_progress" else 0.3

    def launches(prof) -> list[str]:
        return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]

    def run():
        inputs = [zn.clone().requires_grad_(True) for zn in z] if form == "list" else z.clone().requires_grad_(True)
        return ktg_loss(inputs, y, case.gates, temperature=2.0, progress=progress)

    for _ in range(2):  # warm up (lazy init, caching allocator)
        run().sum().backward()
    losses = run()
    grad_out = torch.ones_like(losses)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof_fwd:
        losses = run()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof_bwd:
        losses.backward(grad_out)
        torch.cuda.synchronize()
    fwd = [n for n in launches(prof_fwd) if "ktg" in n.lower()]
    bwd = [n for n in launches(prof_bwd) if "ktg" in n.lower()]
    assert len(fwd) == 1, launches(prof_fwd)
    assert len(bwd) == 1, launches(prof_bwd)
    # Nothing else copies the logits: no stack, no cat (the inputs' clones precede the op).
    assert not any("cat" in n.lower() or "stack" in n.lower() for n in launches(prof_fwd)), launches(prof_fwd)


def test_no_host_sync():
    """A step with a device-resident progress never waits for the GPU."""
    needs_kernel(torch.device("cuda"))
    case, z, y = make_case(504, 3, 32, 10)
    parts = [zn.float().cuda().requires_grad_(True) for zn in z]
    y = y.cuda()
    loss_fn = KTGLoss(case.gates, temperature=2.0)
    progress = torch.tensor(0.25, device="cuda")
    loss_fn(parts, y, progress=progress).sum().backward()  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in parts:
            p.grad = None
        loss_fn(parts, y, progress=progress).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.grad).all() for p in parts)


def test_device_progress_tensor_is_read_each_call():
    """The progress tensor is read when the kernel runs: updating it in place changes
    the next call's losses (a compiled or captured step can feed k/K this way)."""
    needs_kernel(torch.device("cuda"))
    gates = [["through", "linear"], ["linear", "through"]]
    case, z, y = make_case(505, 2, 16, 10)
    z, y = z.float().cuda(), y.cuda()
    progress = torch.tensor(0.25, device="cuda")
    first = ktg_loss(z, y, gates, progress=progress)
    progress.fill_(0.75)
    second = ktg_loss(z, y, gates, progress=progress)
    torch.testing.assert_close(first, ktg_loss(z, y, gates, progress=0.25), rtol=0, atol=0)
    torch.testing.assert_close(second, ktg_loss(z, y, gates, progress=0.75), rtol=0, atol=0)
