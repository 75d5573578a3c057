#!/usr/bin/env bash
# The first thing a session with a lent GPU runs: build the CUDA kernels against the
# device's torch, run the CUDA tests and both benchmarks on CUDA, and write one markdown
# report (device, versions, pass/fail of every GPU bar, the tables) under $OUT.
#
#   bash benchmarks/gpu_check.sh prepare   # HERE, before asking for the device (needs pip's
#                                          # registry): wheels the device lacks + a CIFAR-10
#                                          # subset, into .gpu_check/ (git-ignored, carried)
#   bash benchmarks/gpu_check.sh           # THERE, through the device tool (see README):
#                                          # unattended, about 7 minutes, under 10
#
# The device has torch, timm, accelerate, nvcc and pytest but no registry: `datasets` (for
# bench_train's data) and its missing dependencies travel as wheels in .gpu_check/whl, and
# the data (../shared/data does not travel) as a subset in .gpu_check/cifar10. Every step
# has its own time limit so the report is written even when one hangs; the report is
# rewritten after each step, so a run cut short still returns what it measured.
#
# Environment: PYTHON (default python3), GPU_CHECK_DATA (the CIFAR-10 parquet folder for
# `prepare`, default ../shared/data/cifar10), GPU_CHECK_BUILD_S / _TESTS_S / _LOSS_S /
# _TRAIN_S / _COMPILE_S (per-step limits in seconds), GPU_CHECK_SKIP_BUILD=1 (a rerun on a machine that
# still has the build).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
STAGE=".gpu_check"

prepare() {
  command -v "$PY" >/dev/null || PY=python
  mkdir -p "$STAGE/whl" "$STAGE/cifar10"
  if [ -d .git ] && ! grep -qx "/$STAGE/" .git/info/exclude 2>/dev/null; then
    echo "/$STAGE/" >> .git/info/exclude  # ignored, so the device tool can carry it
  fi
  # The versions this project is tested with here; pure-Python wheels for the device's 3.12.
  local pins
  pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("datasets", "dill", "multiprocess")))
EOF
  ) || { echo "gpu_check prepare: datasets is not installed here" >&2; return 1; }
  rm -f "$STAGE"/whl/*.whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$STAGE/whl" $pins || return 1
  # bench_train --quick on CUDA trains 640 images an epoch and evaluates none: a small
  # subset of the real data keeps the carried tree far below the tool's 64 MiB.
  "$PY" - "${GPU_CHECK_DATA:-$ROOT/../shared/data/cifar10}" "$STAGE/cifar10" <<'EOF' || return 1
import sys
import pyarrow.parquet as pq
src, dst = sys.argv[1], sys.argv[2]
for split, rows in (("train", 2560), ("test", 512)):
    table = pq.read_table(f"{src}/{split}.parquet")
    pq.write_table(table.slice(0, rows), f"{dst}/{split}.parquet")
    print(f"{dst}/{split}.parquet: {min(rows, table.num_rows)} rows")
EOF
  ls -l "$STAGE/whl" "$STAGE/cifar10"
  du -sh "$STAGE"
}

# ----------------------------------------------------------------------------- the device run

OUTDIR="${OUT:-$ROOT/output/gpu_check}"
REPORT="$OUTDIR/gpu_check.md"
LOG="$OUTDIR/gpu_check.log"
STEPS=()  # "name|status|seconds"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log it, record the outcome
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS status
  echo "=== $name (limit ${limit}s): $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  case $? in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT (${limit}s)" ;;
    *) status=FAIL ;;
  esac
  STEPS+=("$name|$status|$((SECONDS - t0))")
  echo "=== $name: $status after $((SECONDS - t0))s" >>"$LOG"
  write_report
  [ "$status" = PASS ]
}

write_report() {
  {
    echo "# GPU check — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Written by \`benchmarks/gpu_check.sh\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
    echo
    echo "## Device and versions"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -4
    "$PY" - <<'EOF' 2>&1
import platform, importlib
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPUs {torch.cuda.device_count()}: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}")
for name in ("timm", "accelerate", "datasets", "numpy"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
EOF
    nvcc --version 2>/dev/null | grep release
    echo '```'
    echo
    echo "## Steps"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    for s in "${STEPS[@]}"; do IFS='|' read -r n st sec <<<"$s"; echo "| $n | $st | $sec |"; done
    echo
    echo "## GPU bars"
    echo
    if [ -f "$OUTDIR/tests.xml" ]; then
      "$PY" - "$OUTDIR/tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
cases = list(root.iter("testcase"))
def status(c):
    for tag, word in (("failure", "FAIL"), ("error", "FAIL"), ("skipped", "SKIP")):
        if c.find(tag) is not None:
            return word, (c.find(tag).get("message") or "")[:200].replace("\n", " ")
    return "PASS", ""
rows = [(c.get("classname", "").split(".")[-1] + "::" + c.get("name"),) + status(c) for c in cases]
cuda = [r for r in rows if "cuda" in r[0].lower()]
def counts(rs):
    return ", ".join(f"{sum(1 for r in rs if r[1] == w)} {w.lower()}" for w in ("PASS", "FAIL", "SKIP"))
print(f"- {'PASS' if not any(r[1] == 'FAIL' for r in rows) else 'FAIL'}: tests, all {len(rows)}: {counts(rows)}")
print(f"- {'PASS' if cuda and all(r[1] == 'PASS' for r in cuda) else 'FAIL'}: "
      f"tests on CUDA, {len(cuda)}: {counts(cuda)}")
# The GPU bars of issue 9 by name; a two-GPU test skips on one GPU.
named = ("parity_many_nodes[cuda", "side_stream", "second_device", "one_kernel_each_way", "no_host_sync",
         "device_progress")
for name, word, msg in rows:
    if any(k in name for k in named) or word == "FAIL":
        print(f"- {word}: {name}" + (f" — {msg}" if msg and word != "PASS" else ""))
EOF
    else
      echo "- tests did not run (see the steps)"
    fi
    for f in bench_loss_cuda.md bench_train_cuda.md bench_train_cuda_compile.md; do
      [ -f "$OUTDIR/$f" ] && grep -E '^- (PASS|FAIL|SKIP|INFO):' "$OUTDIR/$f" | sed "s/\$/ ($f)/"
    done
    for f in bench_loss_cuda.md bench_train_cuda.md bench_train_cuda_compile.md; do
      if [ -f "$OUTDIR/$f" ]; then
        echo
        echo "## ${f%.md}"
        echo
        sed '1{/^# /d}' "$OUTDIR/$f"
      fi
    done
    echo
    echo "The full log is gpu_check.log beside this file."
  } >"$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
}

run_on_device() {
  mkdir -p "$OUTDIR"
  : >"$LOG"
  export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" TIMM_DCL_CUDA=1
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}" TIMM_DCL_JIT=0
  if ls "$STAGE"/whl/*.whl >/dev/null 2>&1; then
    step "carried wheels" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/gpu_check_site "$STAGE"/whl/*.whl \
      && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then  # 1: a rerun on a machine that kept the build
    step "build (pip install -e . --no-build-isolation --no-deps)" "${GPU_CHECK_BUILD_S:-200}" \
      "$PY" -m pip install -q -e . --no-build-isolation --no-deps || { write_report; return 1; }
  fi
  step "CUDA kernels load" 120 "$PY" -c "import torch, timm_dcl; k = timm_dcl.kernels_available(); \
print(k); assert torch.cuda.is_available() and 'cuda' in k, k" || { write_report; return 1; }
  # The first lent GPU (torch 2.11) segfaulted where the op raises a C++ error; this step says
  # in one line whether an error still reaches Python as an exception.
  step "a C++ error reaches Python (IndexError for label -1)" 60 "$PY" -c "import torch, timm_dcl
try:
    timm_dcl.ktg_loss(torch.randn(3, 4, 5), torch.tensor([0, -1, 2, 1]), [['through'] * 3] * 3)
except IndexError as e:
    print('raised:', str(e).splitlines()[0])
else:
    raise SystemExit('no error raised')"
  # Under pytest-xdist (where the device has it) a test that crashes the process fails alone
  # instead of ending the run: the first lent GPU lost every later test to one segfault.
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)
  step "tests (test_ktg_loss*.py)" "${GPU_CHECK_TESTS_S:-120}" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
    tests/test_ktg_loss.py tests/test_ktg_loss_host.py tests/test_ktg_loss_compile.py tests/test_ktg_loss_cuda.py \
    --junitxml="$OUTDIR/tests.xml"
  step "bench_loss.py --device cuda --quick" "${GPU_CHECK_LOSS_S:-110}" \
    "$PY" benchmarks/bench_loss.py --device cuda --quick --output "$OUTDIR/bench_loss_cuda.md"
  local data="$STAGE/cifar10"
  [ -f "$data/train.parquet" ] || data="$ROOT/../shared/data/cifar10"
  step "bench_train.py --device cuda --quick" "${GPU_CHECK_TRAIN_S:-130}" \
    "$PY" benchmarks/bench_train.py --device cuda --quick --data-dir "$data" --output "$OUTDIR/bench_train_cuda.md"
  # The launch-bound step of the first check: the same benchmark with the whole step compiled.
  step "bench_train.py --device cuda --quick --compile" "${GPU_CHECK_COMPILE_S:-200}" \
    "$PY" benchmarks/bench_train.py --device cuda --quick --compile --cudnn-benchmark --data-dir "$data" \
    --output "$OUTDIR/bench_train_cuda_compile.md"
  write_report
  echo "report: $REPORT"
  for s in "${STEPS[@]}"; do [[ "$s" == *"|PASS|"* ]] || return 1; done
}

case "${1:-run}" in
  prepare) prepare ;;
  run) run_on_device ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [prepare|run]" >&2; exit 2 ;;
esac
