"""torch.compile(fullgraph=True) of code that calls the fused KTG loss with a progress
(k/K) that changes every step: no graph break, and no recompilation.

A training loop should pass ``progress`` as a one-element tensor: a graph input from the
first call, so the step compiles once. A float works too, at the cost of one
recompilation on the second call (dynamo's automatic dynamic: a float is a constant of
the first graph, a graph input from the second on).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import timm_dcl
from test_ktg_loss import make_case, needs_kernel
from timm_dcl import KTGLoss

GATES = [["through", "linear", "correct"], ["linear", "through", "through"], ["correct", "linear", "through"]]
PROGRESS = (0.125, 0.5, 0.75, 1.0)


def progress_arg(form: str, p: float):
    return p if form == "float" else torch.tensor(p, dtype=torch.float64)


def compiled_versions(fn) -> int:
    """How many compiled versions of fn dynamo holds (one per (re)compilation)."""
    return len(_debug_get_cache_entry_list(fn.__code__))


def run_steps(fn, z, y, form):
    """Losses and gradients of fn at every progress value. Recompiling is an error from
    the second call on for a tensor progress, from the third for a float: dynamo compiles
    a float as a constant first and makes it a graph input when it changes."""
    out = []
    for i, p in enumerate(PROGRESS):
        with torch._dynamo.config.patch(error_on_recompile=i >= (1 if form == "tensor" else 2)):
            zz = z.clone().requires_grad_(True)
            losses = fn(zz, y, progress_arg(form, p))
        (losses * torch.tensor([1.0, 0.5, 2.0])).sum().backward()
        out.append((losses.detach(), zz.grad))
    return out


@pytest.mark.parametrize("api", ["function", "module", "module_list"])
@pytest.mark.parametrize("form", ["float", "tensor"])
def test_changing_progress_compiles_once(api, form):
    needs_kernel(torch.device("cpu"))
    loss_fn = KTGLoss(GATES, temperature=2.0)
    if api == "function":
        def step(z, y, progress):
            return timm_dcl.ktg_loss(torch.tanh(z) * 3, y, GATES, temperature=2.0, progress=progress)
    elif api == "module":
        def step(z, y, progress):
            return loss_fn(torch.tanh(z) * 3, y, progress=progress)
    else:  # the trainer's form: a list of the nodes' outputs, not stacked
        def step(z, y, progress):
            return loss_fn([torch.tanh(zn) * 3 for zn in z.unbind(0)], y, progress=progress)

    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    _, z, y = make_case(401, 3, 8, 10)
    z = z.float()
    got = run_steps(compiled, z, y, form)
    assert compiled_versions(step) == (1 if form == "tensor" else 2)
    want = run_steps(step, z, y, form)
    for (gl, gg), (wl, wg), p in zip(got, want, PROGRESS):
        torch.testing.assert_close(gl, wl, rtol=1e-6, atol=1e-6, msg=lambda m: f"losses at {p}: {m}")
        torch.testing.assert_close(gg, wg, rtol=1e-6, atol=1e-6, msg=lambda m: f"gradient at {p}: {m}")
    assert not torch.equal(got[0][0], got[-1][0])  # the progress did change the losses


def test_compiled_step_with_networks():
    """Node forwards and the loss in one fullgraph region (the backward is AOT-compiled
    with it), progress changing every call: one compilation, eager's numbers."""
    needs_kernel(torch.device("cpu"))
    torch.manual_seed(0)
    nets = torch.nn.ModuleList(torch.nn.Linear(12, 10) for _ in range(3))
    loss_fn = KTGLoss(GATES, temperature=2.0)

    def step(x, y, progress):
        return loss_fn([net(x) for net in nets], y, progress=progress).sum()

    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(16, 12), torch.randint(10, (16,))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p in PROGRESS:
            results = []
            for fn in (step, compiled):
                nets.zero_grad()
                loss = fn(x, y, torch.tensor(p, dtype=torch.float64))
                loss.backward()
                results.append((loss.detach(), [q.grad.clone() for q in nets.parameters()]))
            (wl, wg), (gl, gg) = results
            torch.testing.assert_close(gl, wl, rtol=1e-6, atol=1e-6)
            for a, b in zip(gg, wg):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled_versions(step) == 1
