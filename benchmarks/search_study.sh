#!/usr/bin/env bash
# Issue 8's measured study (benchmarks/RESULTS.md, "A measured search"): node 0 = resnet20,
# nodes 1-2 from {resnet20, resnet32}, 33 trials (the 3 baselines, then 30 random graphs)
# with ASHA at rungs 1, 2, 4 epochs on 5,000 CIFAR-10 images (2,000 more held out to
# validate), then --report: the best searched graph and the baselines retrained on 5,000
# images of the training split, 3 seeds each, node 0 scored on 5,000 test images at the
# last epoch (the test split selects nothing). About 90 minutes on 2 quiet cores; 2 h 20 min
# on the shared machine of 2026-11-29 (RESULTS.md). Resumable: run it again after an
# interruption and it finishes what is missing (finished trials and report runs are kept).
#   bash benchmarks/search_study.sh [OUTPUT_DIR]      (default: output/search-study)
set -euo pipefail
cd "$(dirname "$0")/.."
O=${1:-output/search-study}
S="--num-nodes 3 --target-model resnet20 --candidates resnet20,resnet32
   --dataset cifar10 --data-dir ../shared/data/cifar10 --train-subset 5000 --val-size 2000
   --eval-subset 5000 --epochs 4 --sched cosine --seed 0 --sampler random --sampler-seed 0
   --no-progress --output $O"
mkdir -p "$O"
/usr/bin/time -v python search_dcl.py $S --n-trials 33 2>&1 | tee -a "$O/search.log"
/usr/bin/time -v python search_dcl.py $S --report --report-top 1 --report-seeds 3 2>&1 | tee -a "$O/report.log"
