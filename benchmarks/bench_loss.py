"""Forward + backward time of the fused KTG loss against the ways it was computed before.

Side by side, per shape (M nodes, batch B, C classes):
  loop      the authors' edge-by-edge loop (softmax, KL as p·log(p/q + ε), gate, per edge)
  reference timm_dcl.ktg_loss_reference in eager mode
  compiled  torch.compile of the reference (compiled once per shape, outside the timing)
  fused     timm_dcl.ktg_loss (one kernel each way where the extension is built)
Rows with soft labels feed every variant float [B, C] target probabilities (what mixup and
label smoothing give) instead of integer labels, and also time the fused op on integer
labels side by side: the soft/int column is what soft targets add.
and the floor: bytes moved over the measured memory bandwidth, against the exp count over
the measured exp throughput on CPU, or two launches' latency on CUDA; the larger counts.

Host overhead, at M=2, B=64, C=10 (where the kernels' arithmetic is negligible): one
forward + backward of the fused op, from a tensor [M, B, C] and from a list of M tensors
(the trainer's case), through ``ktg_loss`` and ``KTGLoss``, against the cheapest autograd
round trip on a tensor of the same shape, ``(z * 2).sum().backward()``.

    python benchmarks/bench_loss.py                  # full sweep, cpu (+ cuda if present)
    python benchmarks/bench_loss.py --quick --no-compile
    python benchmarks/bench_loss.py --device cuda --output bench.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too
from timm_dcl import KTGLoss, kernels_available, ktg_loss, ktg_loss_reference  # noqa: E402
from timm_dcl.gates import GATE_NAMES  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
VARIANTS = ("loop", "reference", "compiled", "fused")
STATS = {"median": statistics.median, "min": min}


# ----------------------------------------------------------------------------- the authors' loop

def edge_loop_loss(logits: list[torch.Tensor], labels: torch.Tensor, gates: list[list[str]],
                   temperature: float = 1.0, progress: float = 1.0, eps: float = 1e-7) -> torch.Tensor:
    """The loss as the original KTG code computes it: every edge separately, then its gate.

    Each edge's per-sample loss is computed even where the gate cuts it off, and the KL is
    p·log(p/(q + ε) + ε) of two softmaxes; this is what the fused op replaces.
    """
    T = temperature
    classes = labels.argmax(dim=1) if labels.is_floating_point() else labels  # soft targets: their argmax
    losses = []
    for t, target in enumerate(logits):
        edges = []
        for s, source in enumerate(logits):
            if s == t:
                per_sample = F.cross_entropy(target, labels, reduction="none")  # soft targets too
                source_logits = torch.eye(target.shape[1], device=target.device)[classes]  # the label as a source
            else:
                p_s = F.softmax(source.detach() / T, dim=1)
                q_t = F.softmax(target / T, dim=1)
                per_sample = (p_s * torch.log(p_s / (q_t + eps) + eps)).sum(dim=1) * (T * T)
                source_logits = source.detach()
            gate = gates[t][s]
            if gate == "through":
                edge = per_sample.mean()
            elif gate == "cutoff":
                edge = torch.zeros_like(per_sample[0], requires_grad=True).sum()
            elif gate == "linear":
                edge = per_sample.mean() * progress
            else:  # correct: keep the samples the source gets right, divide by the whole batch
                mask = (source_logits.argmax(dim=1) == classes).to(per_sample.dtype)
                edge = (per_sample * mask).mean()
            edges.append(edge)
        losses.append(torch.stack(edges).sum())
    return torch.stack(losses)


# ----------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(step, device: torch.device, budget_s: float) -> int:
    """Warm up, then the number of calls that fill about ``budget_s``."""
    for _ in range(2):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    return max(1, int(budget_s / max(time.perf_counter() - t0, 1e-6)))


def _sample(step, device: torch.device, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        step()
    synchronize(device)
    return (time.perf_counter() - t0) / inner


def time_it(step, device: torch.device, repeats: int, budget_s: float, stat=statistics.median) -> float:
    """Seconds per call: warm up, size the inner loop to the budget, then ``stat`` of the repeats."""
    inner = _calibrate(step, device, budget_s / repeats)
    return stat([_sample(step, device, inner) for _ in range(repeats)])


def time_side_by_side(steps: dict, device: torch.device, repeats: int, budget_s: float,
                      stat=statistics.median) -> dict:
    """``time_it`` of several steps, their repeats interleaved so that a load that comes
    and goes on a shared machine falls on all of them alike, not on one column."""
    inner = {name: _calibrate(step, device, budget_s / repeats) for name, step in steps.items()}
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(_sample(step, device, inner[name]))
    return {name: stat(values) for name, values in samples.items()}


@dataclass
class Machine:
    """Measured limits of the device, for the floor."""
    bandwidth: float            # bytes/s of a large copy (read + write)
    exp_rate: float = 0.0       # exps/s on cache-resident data, all threads (CPU)
    launch: float = 0.0         # s for one tiny kernel launch + sync (CUDA)

    def floor(self, M: int, B: int, C: int, itemsize: int, temperature: float, device: torch.device):
        # The op reads the logits forward, reads them again backward and writes the gradient.
        bytes_moved = 3 * M * B * C * itemsize + B * 8
        memory = bytes_moved / self.bandwidth
        if device.type == "cuda":
            return max(memory, 2 * self.launch), memory, 2 * self.launch
        # softmax(z/T) of every node forward and again backward; softmax(z) too when T ≠ 1.
        exps = 2 * M * B * C * (1 if temperature == 1.0 else 2)
        compute = exps / self.exp_rate
        return max(memory, compute), memory, compute


def measure_machine(device: torch.device) -> Machine:
    """Peak copy bandwidth and exp rate (best of the repeats: a limit, not a typical time)."""
    n = (256 << 20) // 4 if device.type == "cuda" else (128 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy = time_it(lambda: dst.copy_(src), device, repeats=5, budget_s=0.5, stat=min)
    machine = Machine(bandwidth=2 * src.numel() * src.element_size() / copy)
    del src, dst
    if device.type == "cuda":
        tiny = torch.zeros(1, device=device)

        def launch():
            tiny.add_(1)
            torch.cuda.synchronize(device)
        machine.launch = time_it(launch, device, repeats=9, budget_s=0.2, stat=min)
    else:
        # Timed on one thread (a parallel region waiting for a busy core would time the
        # scheduler, not exp) on 64 KiB that stay in cache, then scaled by the thread count.
        threads = torch.get_num_threads()
        x = torch.randn(1 << 14)
        out = torch.empty_like(x)
        torch.set_num_threads(1)
        try:
            per_thread = x.numel() / time_it(lambda: torch.exp(x, out=out), device, repeats=9, budget_s=0.3,
                                             stat=min)
        finally:
            torch.set_num_threads(threads)
        machine.exp_rate = per_thread * threads
    return machine


# ----------------------------------------------------------------------------- one row

@dataclass
class Row:
    device: str
    M: int
    B: int
    C: int
    gates: str
    labels: str = "int"                         # "soft": float [B, C] target probabilities
    times: dict = field(default_factory=dict)   # variant -> seconds
    floor: float = 0.0
    floor_parts: tuple = ()
    compile_s: float = 0.0
    bars: list = field(default_factory=list)    # (text, passed)


def mixed_gates(M: int) -> list[list[str]]:
    gen = torch.Generator().manual_seed(M)
    codes = torch.randint(len(GATE_NAMES), (M, M), generator=gen).tolist()
    for n in range(M):  # every gate type appears, and every node still learns from its label
        codes[n][n] = 0
        codes[n][(n + 1) % M] = 1 + n % 3
    return [[GATE_NAMES[c] for c in row] for row in codes]


def run_row(device: torch.device, M: int, B: int, C: int, gates_kind: str, args, machine: Machine,
            compile_this: bool, labels: str = "int") -> Row:
    dtype = DTYPES[args.dtype]
    gates = [["through"] * M for _ in range(M)] if gates_kind == "through" else mixed_gates(M)
    T, progress = args.temperature, 0.5
    gen = torch.Generator(device=device).manual_seed(M * 1000 + B + C)
    z = (torch.randn(M, B, C, generator=gen, device=device) * 2).to(dtype).requires_grad_(True)
    y = y_int = torch.randint(C, (B,), generator=gen, device=device)
    if labels == "soft":  # smoothed, mixed targets as timm's Mixup gives them
        y = (torch.randn(B, C, generator=gen, device=device) * 2).softmax(dim=1)
    parts = [zn.detach().clone().requires_grad_(True) for zn in z]  # separate networks' outputs

    def reset():
        z.grad = None
        for p in parts:
            p.grad = None

    def stepper(fn, inputs, targets=y):
        def step():
            reset()
            fn(inputs, targets).sum().backward()
        return step

    fns = {
        "loop": (lambda zz, yy: edge_loop_loss(zz, yy, gates, T, progress), parts),
        "reference": (lambda zz, yy: ktg_loss_reference(zz, yy, gates, temperature=T, progress=progress), z),
        "fused": (lambda zz, yy: ktg_loss(zz, yy, gates, temperature=T, progress=progress), z),
    }
    row = Row(device.type, M, B, C, gates_kind, labels)
    if compile_this:
        torch.compiler.reset()
        compiled = torch.compile(fns["reference"][0], dynamic=False)
        t0 = time.perf_counter()
        stepper(compiled, z)()  # compiles forward and backward here, outside the timing
        row.compile_s = time.perf_counter() - t0
        fns["compiled"] = (compiled, z)

    steps = {name: stepper(*fns[name]) for name in VARIANTS if name in fns}
    if labels == "soft":
        steps["fused int"] = stepper(*fns["fused"], targets=y_int)
    row.times = time_side_by_side(steps, device, args.repeats, args.budget, STATS[args.stat])
    row.floor, *floor_parts = machine.floor(M, B, C, z.element_size(), T, device)
    row.floor_parts = tuple(floor_parts)
    return row


# ----------------------------------------------------------------------------- host overhead

OVERHEAD_SHAPE = (2, 64, 10)
OVERHEAD_BAR = 2.0  # fused forward + backward ≤ 2× the cheapest autograd round trip (CPU)


def run_overhead(device: torch.device, args) -> dict:
    """Seconds per call of the round trip and of the fused op's four ways in, side by side."""
    M, B, C = OVERHEAD_SHAPE
    gen = torch.Generator(device=device).manual_seed(1)
    z = torch.randn(M, B, C, generator=gen, device=device).requires_grad_(True)
    parts = [zn.detach().clone().requires_grad_(True) for zn in z]
    y = torch.randint(C, (B,), generator=gen, device=device)
    gates = [["through"] * M for _ in range(M)]
    module = KTGLoss(gates)

    def clear():
        z.grad = None
        for p in parts:
            p.grad = None

    def roundtrip():
        clear()
        (z * 2).sum().backward()

    def call(fn, inputs):
        def step():
            clear()
            fn(inputs).sum().backward()
        return step

    steps = {
        "round trip": roundtrip,
        "ktg_loss(tensor)": call(lambda zz: ktg_loss(zz, y, gates, progress=0.5), z),
        "ktg_loss(list)": call(lambda zz: ktg_loss(zz, y, gates, progress=0.5), parts),
        "KTGLoss(tensor)": call(lambda zz: module(zz, y, progress=0.5), z),
        "KTGLoss(list)": call(lambda zz: module(zz, y, progress=0.5), parts),
    }
    # Many short samples (about 1 ms each): on a shared machine the minimum then finds
    # stretches where nothing preempted the process; one long sample rarely is one.
    return time_side_by_side(steps, device, max(40, args.repeats * 25), args.budget, STATS[args.stat])


def overhead_table(results: dict) -> str:
    lines = ["| device | " + " | ".join(f"{name} µs" for name in next(iter(results.values()))) + " | "
             + " | ".join(f"{name} / round trip" for name in list(next(iter(results.values())))[1:]) + " |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for dev, t in results.items():
        base = t["round trip"]
        lines.append(f"| {dev} | " + " | ".join(f"{v * 1e6:.1f}" for v in t.values()) + " | "
                     + " | ".join(f"{v / base:.2f}×" for name, v in t.items() if name != "round trip") + " |")
    return "\n".join(lines)


def overhead_bars(results: dict, args) -> list:
    if "cpu" not in results or args.threads != 2 or args.dtype != "float32":
        return []
    t = results["cpu"]
    out = []
    for name in ("ktg_loss(tensor)", "ktg_loss(list)"):
        ratio = t[name] / t["round trip"]
        out.append((f"cpu M=2 B=64 C=10: fused forward + backward ≤ {OVERHEAD_BAR:g}× the cheapest autograd round "
                    f"trip, {name} (got {ratio:.2f}×)", ratio <= OVERHEAD_BAR))
    return out


# ----------------------------------------------------------------------------- bars

BAR_SHAPES = {"cpu": [(7, 128, 100), (3, 64, 100)], "cuda": [(7, 128, 100), (7, 4096, 1000)]}


def judge(row: Row, args) -> None:
    """Attach the issue's bars that apply to this row."""
    if row.gates != "through" or args.dtype != "float32":
        return
    t = row.times
    shape = (row.M, row.B, row.C)
    if row.device == "cpu" and args.threads != 2:
        return
    if row.labels == "soft":
        if row.device == "cpu" and shape == (7, 128, 100):
            extra = t["fused"] / t["fused int"] - 1
            row.bars.append((f"cpu M=7 B=128 C=100: soft targets add ≤ 15 % to the fused forward + backward "
                             f"(got {extra * 100:+.1f} %)", extra <= 0.15))
            ratio = t["loop"] / t["fused"]
            row.bars.append((f"cpu M=7 B=128 C=100, soft targets: fused ≥ 30× loop (got {ratio:.1f}×)", ratio >= 30))
        return
    if shape == (7, 128, 100):
        want = 30 if row.device == "cpu" else 20
        ratio = t["loop"] / t["fused"]
        row.bars.append((f"{row.device} M=7 B=128 C=100: fused ≥ {want}× loop (got {ratio:.1f}×)", ratio >= want))
        if row.device == "cpu":
            if "compiled" in t:
                ratio = t["compiled"] / t["fused"]
                row.bars.append((f"cpu M=7 B=128 C=100: fused ≥ 3× compiled reference (got {ratio:.1f}×)",
                                 ratio >= 3))
            else:
                row.bars.append(("cpu M=7 B=128 C=100: fused ≥ 3× compiled reference (not measured: --no-compile)",
                                 None))
    if row.device == "cpu" and shape == (3, 64, 100):
        ratio = t["loop"] / t["fused"]
        row.bars.append((f"cpu M=3 B=64 C=100: fused ≥ 8× loop (got {ratio:.1f}×)", ratio >= 8))
    if row.device == "cuda" and (row.B, row.C) == (4096, 1000):
        ratio = t["fused"] / row.floor
        row.bars.append((f"cuda M={row.M} B=4096 C=1000: fused within 3× of the floor (got {ratio:.2f}×)",
                         ratio <= 3))


# ----------------------------------------------------------------------------- output

def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.1f}×"


def table(rows: list[Row]) -> str:
    head = ("| device | M | B | C | gates | labels | loop ms | reference ms | compiled ms | fused ms | "
            "loop/fused | ref/fused | compiled/fused | floor ms | fused/floor | soft/int |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r.times
        lines.append(
            f"| {r.device} | {r.M} | {r.B} | {r.C} | {r.gates} | {r.labels} | {ms(t.get('loop'))} | "
            f"{ms(t.get('reference'))} | "
            f"{ms(t.get('compiled'))} | {ms(t.get('fused'))} | {ratio(t.get('loop'), t.get('fused'))} | "
            f"{ratio(t.get('reference'), t.get('fused'))} | {ratio(t.get('compiled'), t.get('fused'))} | "
            f"{ms(r.floor)} | {ratio(t.get('fused'), r.floor)} | "
            f"{'—' if 'fused int' not in t else format(t['fused'] / t['fused int'], '.3f')} |")
    return "\n".join(lines)


def summary(rows: list[Row], machines: dict, args, extra_bars=()) -> str:
    lines = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, dtype {args.dtype}, "
             f"T = {args.temperature}, CPU threads {args.threads}, {args.stat} of {args.repeats} repeats, "
             f"kernels_available() = {sorted(kernels_available())}"]
    if hasattr(os, "getloadavg"):  # this run itself accounts for about --threads of it
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
        busy = " (other work was running: CPU times are noisy, try --stat min)" if load > cpus + 1 else ""
        lines.append(f"load average (1 min) at the end: {load:.2f} on {cpus} CPUs{busy}")
    for dev, m in machines.items():
        extra = (f", launch+sync {m.launch * 1e6:.1f} µs" if dev == "cuda"
                 else f", exp throughput {m.exp_rate / 1e9:.2f} G/s ({args.threads} threads)")
        lines.append(f"{dev}: copy bandwidth {m.bandwidth / 1e9:.1f} GB/s{extra}")
    compiles = [f"{r.device} M={r.M} B={r.B} C={r.C}: {r.compile_s:.1f} s" for r in rows if r.compile_s]
    if compiles:
        lines.append("torch.compile time (not in the table): " + "; ".join(compiles))
    lines.append("floor ms = max(bytes moved / bandwidth, exps / exp throughput) on CPU, "
                 "max(bytes moved / bandwidth, 2 launches) on CUDA")
    lines.append("")
    lines.append("Bars:")
    bars = [b for r in rows for b in r.bars] + list(extra_bars)
    for text, passed in bars:
        lines.append(f"- {'PASS' if passed else ('FAIL' if passed is False else 'SKIP')}: {text}")
    if not bars:
        lines.append("- none apply (the bars are for float32 and, on CPU, --threads 2)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                    help="'all' = cpu, and cuda when a GPU is present")
    ap.add_argument("--quick", action="store_true", help="bar shapes and a few others, shorter timing")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the CPU bars assume 2)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--compile", choices=("bars", "all", "none"), default="bars",
                    help="which shapes get the torch.compile variant (compiling is the slow part)")
    ap.add_argument("--no-compile", dest="compile", action="store_const", const="none")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per variant")
    ap.add_argument("--stat", choices=tuple(STATS), default="median",
                    help="statistic over the repeats ('min' resists a machine shared with other work)")
    ap.add_argument("--output", type=Path, help="also write the table and the summary as markdown here")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 7)
    args.budget = args.budget or (0.15 if args.quick else 0.4)
    return args


def shapes_for(device: str, quick: bool) -> list[tuple[int, int, int, str]]:
    sweep = [(M, B, C) for M in (2, 3, 5, 7) for B in (64, 256) for C in (10, 100, 1000)]
    if quick:
        sweep = [(2, 64, 10), (5, 256, 1000)]
    shapes = list(dict.fromkeys(BAR_SHAPES[device] + sweep))  # bars first, no duplicates
    return ([(M, B, C, "through", "int") for M, B, C in shapes] + [(7, 128, 100, "mixed", "int")]
            + [(7, 128, 100, "through", "soft"), (7, 128, 100, "mixed", "soft")])


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("--device cuda: no CUDA device")
        devices.remove("cuda")
    for dev in devices:
        if dev not in kernels_available():
            print(f"warning: no compiled {dev} kernel; 'fused' times the reference fallback", file=sys.stderr)

    machines = {dev: measure_machine(torch.device(dev)) for dev in devices}
    overhead = {dev: run_overhead(torch.device(dev), args) for dev in devices}
    jobs = [(dev, shape) for dev in devices for shape in shapes_for(dev, args.quick)]
    rows = []
    for dev, (M, B, C, gates_kind, labels) in tqdm(jobs, desc="bench", unit="shape", file=sys.stderr):
        is_bar = (M, B, C) in BAR_SHAPES[dev] and gates_kind == "through" and labels == "int"
        compile_this = args.compile == "all" or (args.compile == "bars" and is_bar and (M, B, C) == (7, 128, 100))
        row = run_row(torch.device(dev), M, B, C, gates_kind, args, machines[dev], compile_this, labels)
        judge(row, args)
        rows.append(row)

    extra = overhead_bars(overhead, args)
    text = (table(rows) + "\n\nHost overhead, M=2 B=64 C=10, forward + backward:\n\n" + overhead_table(overhead)
            + "\n\n" + summary(rows, machines, args, extra) + "\n")
    print(text)
    if args.output:
        args.output.write_text("# KTG loss benchmark\n\n" + text)
    return 1 if any(passed is False for _, passed in [b for r in rows for b in r.bars] + extra) else 0


if __name__ == "__main__":
    raise SystemExit(main())
