"""Peak memory of one training epoch of timm_dcl.data: the streaming path against the in-memory path.

Each path runs in a fresh subprocess of this script. It imports the libraries, opens the source
(datasets converts parquet to Arrow files once; not counted), then samples the proportional
anonymous memory (``Pss_Anon``: what the processes hold, pages shared after fork counted once, and
not the memory-mapped Arrow files, which are page cache) of itself and its DataLoader workers
every few milliseconds while it builds the data and
runs one epoch of the train loader (including the loader's ``augment``). Reported: that peak over
the level before ``build_data``, for the main process and the workers together, and the epoch's
wall time.

    python benchmarks/bench_data_memory.py                                   # Tiny-ImageNet 4000 train
    python benchmarks/bench_data_memory.py --dataset cifar10 --data-dir ../shared/data/cifar10 \\
        --train-subset 10000 --workers 0 2
    python benchmarks/bench_data_memory.py --input-size 128                  # streaming resizes per image
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _anon_kib(pid: int) -> int:
    # Pss_Anon, not RssAnon: forked workers share the parent's pages copy-on-write, and RSS would
    # count those once per process.
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss_Anon:"))
    except (OSError, StopIteration):  # a worker that just exited
        return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree_kib() -> int:
    me = os.getpid()
    pids, todo = [me], [me]
    while todo:
        kids = _children(todo.pop())
        pids += kids
        todo += kids
    return sum(_anon_kib(p) for p in pids)


def child(args) -> dict:
    import datasets  # noqa: F401  imported before the baseline: library memory is not the data's
    import timm.data  # noqa: F401
    import torchvision.ops  # noqa: F401
    from timm_dcl.data import build_data, open_source
    open_source(args.dataset, data_dir=args.data_dir)
    base = _tree_kib()
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_kib())
            time.sleep(0.01)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    start = time.perf_counter()
    data = build_data(args.dataset, data_dir=args.data_dir, train_subset=args.train_subset, eval_subset=args.eval_subset,
                      in_memory=args.path == "memory", cache=False, input_size=args.input_size,
                      num_workers=args.workers)
    built = time.perf_counter()
    loader = data.train_loader(args.batch_size, seed=0, workers=args.workers)
    images = 0
    for x, y in loader:
        x = loader.augment(x, None)
        images += len(y)
    end = time.perf_counter()
    stop.set()
    t.join()
    return {"path": args.path, "workers": args.workers, "images": images, "input_size": list(data.input_size),
            "peak_mib": round((peak[0] - base) / 1024, 1), "build_s": round(built - start, 2),
            "epoch_s": round(end - built, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="tiny-imagenet")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "tiny-imagenet-200"))
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--eval-subset", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader workers of the streaming path (and decoding processes in memory)")
    p.add_argument("--child", choices=("memory", "stream"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.path, args.workers = args.child, args.workers[0]
        print(json.dumps(child(args)))
        return
    common = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--batch-size", str(args.batch_size)]
    for flag, value in (("--train-subset", args.train_subset), ("--eval-subset", args.eval_subset),
                        ("--input-size", args.input_size)):
        if value is not None:
            common += [flag, str(value)]
    rows = []
    for path in ("memory", "stream"):
        for workers in (args.workers if path == "stream" else args.workers[:1]):
            out = subprocess.run([sys.executable, __file__, "--child", path, "--workers", str(workers), *common],
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            if out.returncode != 0:
                sys.exit(out.stderr)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.dataset} ({args.data_dir}), train_subset={args.train_subset}, input_size={args.input_size}, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs")
    print("| path | workers | images | input | peak MiB (main + workers) | build s | epoch s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['workers']} | {r['images']} | {r['input_size'][1]}×{r['input_size'][2]} | "
              f"{r['peak_mib']} | {r['build_s']} | {r['epoch_s']} |")


if __name__ == "__main__":
    main()
