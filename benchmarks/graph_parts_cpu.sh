#!/usr/bin/env bash
# Issue 10's measurement (benchmarks/RESULTS.md, "Ensemble teachers and feature edges"): three
# resnet20 on 10,000 CIFAR-10 training images for 5 epochs (cosine lr), one seed each, node 0
# scored on the whole test split: DML; the same DML plus a through feature edge (attention
# transfer at the last stage) on every pair, at the default weight 500 and at 50; and nodes
# that learn from the labels and from an ensemble teacher (the mean of their logits) instead
# of from each other.
#   bash benchmarks/graph_parts_cpu.sh [OUTPUT_DIR]      (default: output/graph-parts)
set -euo pipefail
cd "$(dirname "$0")/.."
O=${1:-output/graph-parts}
D="--dataset cifar10 --data-dir ../shared/data/cifar10 --train-subset 10000 --epochs 5 --sched cosine
   --seed 0 --no-progress"
L="accelerate launch --cpu"
R3=resnet20,resnet20,resnet20
$L train_dcl.py --node-models $R3 --preset dml $D --output $O/dml
$L train_dcl.py --node-models $R3 --preset dml --feature-gates "cutoff,through,through;through,cutoff,through;through,through,cutoff" \
    $D --output $O/dml_at
$L train_dcl.py --node-models $R3 --preset dml --feature-gates "cutoff,through,through;through,cutoff,through;through,through,cutoff" \
    --feature-weight 50 $D --output $O/dml_at_w50
$L train_dcl.py --node-models $R3,ensemble \
    --gates "through,cutoff,cutoff,through;cutoff,through,cutoff,through;cutoff,cutoff,through,through;cutoff,cutoff,cutoff,cutoff" \
    $D --output $O/ensemble_teacher

python - "$O" <<'PY'
import json, sys
from pathlib import Path
print(f"{'run':<18} {'node 0':>7} {'node 1':>7} {'node 2':>7} {'ens. of all':>11}   minutes")
for run in ("dml", "dml_at", "dml_at_w50", "ensemble_teacher"):
    recs = [json.loads(l) for l in (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    print(f"{run:<18} " + " ".join(f"{t:7.2f}" for t in last["top1"][:3])
          + f" {last['ensemble_top1']:11.2f}   {sum(r['time'] for r in recs) / 60:.1f}")
PY
