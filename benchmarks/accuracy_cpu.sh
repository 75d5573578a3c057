#!/usr/bin/env bash
# Accuracy at equal budget on CPU (benchmarks/RESULTS.md): resnet20 alone, DML, KD from a
# pre-trained teacher; then a small ASHA search and its best graph against DML.
# About 55 minutes on 2 cores. Run from anywhere with the package installed:
#   bash benchmarks/accuracy_cpu.sh [OUTPUT_DIR]      (default: output/accuracy)
set -euo pipefail
cd "$(dirname "$0")/.."
O=${1:-output/accuracy}
D="--dataset cifar10 --data-dir ../shared/data/cifar10 --sched cosine --seed 0 --no-progress"
L="accelerate launch --cpu"

$L train_dcl.py --node-models resnet20 $D --train-subset 10000 --epochs 5 --output $O/alone
$L train_dcl.py --node-models resnet20,resnet20 --preset dml $D --train-subset 10000 --epochs 5 --output $O/dml
$L train_dcl.py --node-models resnet32 $D --train-subset 10000 --epochs 10 --output $O/teacher
$L train_dcl.py --node-models resnet20,resnet32 --preset kd --checkpoints ,$O/teacher/nodes/node0_resnet32.pth \
    $D --train-subset 10000 --epochs 5 --output $O/kd

python search_dcl.py --num-nodes 3 --target-model resnet20 --candidates resnet20,resnet32 $D \
    --train-subset 4000 --val-size 1000 --epochs 4 --n-trials 12 --output $O/search
$L train_dcl.py --graph $O/search/best_graph.json $D --train-subset 4000 --epochs 4 --output $O/best
$L train_dcl.py --node-models resnet20,resnet20,resnet20 --preset dml $D --train-subset 4000 --epochs 4 --output $O/dml3

python - "$O" <<'PY'
import json, sys
from pathlib import Path
for run in ("alone", "dml", "teacher", "kd", "best", "dml3"):
    s = json.loads((Path(sys.argv[1]) / run / "summary.json").read_text())
    print(f"{run:<8} {','.join(s['nodes']):<32} node 0 top-1 {s['final_top1'][0]:6.2f}")
PY
