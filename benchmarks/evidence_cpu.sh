#!/usr/bin/env bash
# Evidence that a graph helps, on this project's 2-core CPU (issue 15): one resumable script.
#
#   bash benchmarks/evidence_cpu.sh [OUT]      # default OUT = output/evidence
#
# The setting, built for signal on a CPU: a teacher that knows more than the student's data
# (resnet32 on all 50,000 CIFAR-10 training images, cosine), and the student, node 0 = resnet20,
# trained on a class-balanced subset (EVIDENCE_SUBSET images, default 3,000) for EVIDENCE_EPOCHS
# (default 30, cosine), scored on the full 10,000-image test split at the last epoch.
#
# Parts, each skipped when its outputs are there, so killing and rerunning the script loses no
# finished run (an interrupted one resumes from its last epoch):
#   1. the teacher (one-node run, OUT/pretrained/cifar10/resnet32, about an hour)
#   2. the graphs as JSON files (OUT/graphs/*.json)
#   3. the pilot: the report of `alone` and `kd-t2` over 3 seeds; from their seed-to-seed spread
#      the number of seeds that resolves a 1.5-point paired difference at 95 % (OUT/pilot.json,
#      OUT/pilot.md)
#   4. a short ASHA search over 3-node graphs at the student's budget (OUT/search; its validation
#      split is held out of the training images, never the test split)
#   5. the final report of every graph over those seeds, paired by seed (OUT/search/report.md,
#      report.json, report.png; copied with the timings into OUT/evidence.md)
# OUT/timings.tsv records how long each part took.
#
# Environment: PYTHON (default python3), EVIDENCE_DATA (the CIFAR-10 parquet folder, default
# ../shared/data/cifar10), EVIDENCE_TEACHER_EPOCHS (15), EVIDENCE_SUBSET, EVIDENCE_EPOCHS,
# EVIDENCE_TRIALS (search trials, 10), EVIDENCE_MAX_SEEDS (6), EVIDENCE_BUDGET_MIN (the minutes
# parts 3–5 may take, 240), EVIDENCE_FLAGS (more flags for every run, e.g. "--eval-subset 500"
# for a quick smoke run of the script itself),
# EVIDENCE_WORKERS (2: the search and the reports run as that many single-threaded workers sharing
# the study and the runs' lock files, as `accelerate launch --num_processes N` would start them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$(mkdir -p "${1:-output/evidence}" && cd "${1:-output/evidence}" && pwd)"
DATA="${EVIDENCE_DATA:-$ROOT/../shared/data/cifar10}"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

STUDENT=resnet20
TEACHER=resnet32
TEACHER_EPOCHS="${EVIDENCE_TEACHER_EPOCHS:-15}"
SUBSET="${EVIDENCE_SUBSET:-3000}"
EPOCHS="${EVIDENCE_EPOCHS:-30}"
VAL=1000                      # the search's validation images, held out of its training images
TRIALS="${EVIDENCE_TRIALS:-10}"
MAX_SEEDS="${EVIDENCE_MAX_SEEDS:-6}"
BUDGET_MIN="${EVIDENCE_BUDGET_MIN:-240}"
RECIPE=(--dataset cifar10 --data-dir "$DATA" --sched cosine --lr 0.1 --batch-size 64 --weight-decay 5e-4
        --no-progress ${EVIDENCE_FLAGS:-})
G="$OUT/graphs"
T_RUN="$OUT/pretrained/cifar10/$TEACHER"
TIMINGS="$OUT/timings.tsv"
[ -f "$TIMINGS" ] || printf 'part\tseconds\tfinished\n' >"$TIMINGS"

WORKERS="${EVIDENCE_WORKERS:-2}"

workers() {  # workers COMMAND...: WORKERS copies of a search_dcl.py command, as one launch's ranks
  local pids=() k status=0
  for ((k = 0; k < WORKERS; k++)); do
    if [ "$WORKERS" -gt 1 ]; then
      WORLD_SIZE=$WORKERS RANK=$k LOCAL_RANK=$k LOCAL_WORLD_SIZE=$WORKERS ACCELERATE_USE_CPU=1 "$@" &
    else
      "$@" &
    fi
    pids+=($!)
  done
  for k in "${pids[@]}"; do wait "$k" || status=$?; done
  return "$status"
}

part() {  # part NAME COMMAND...: run it and record its wall time
  local name="$1" t0=$SECONDS
  shift
  echo "=== $name: $*"
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$(date -u '+%F %T')" >>"$TIMINGS"
}

# 1. The teacher: every training image, evaluated on the test split (it selects nothing: its
#    last epoch is the teacher, whatever the curve does).
if [ ! -f "$T_RUN/nodes/node0_$TEACHER.pth" ]; then
  resume=()
  [ -f "$T_RUN/checkpoints/last.pth" ] && resume=(--resume "$T_RUN")
  part teacher "$PY" train_dcl.py --node-models "$TEACHER" "${RECIPE[@]}" --epochs "$TEACHER_EPOCHS" --seed 0 \
    --output "$T_RUN" "${resume[@]}"
fi

# 2. The graphs. Node 0 is the student everywhere, so seed k starts it from the same weights in
#    every graph and the report's differences pair by seed.
"$PY" - "$G" "$T_RUN/nodes/node0_$TEACHER.pth" "$STUDENT" "$TEACHER" <<'EOF'
import sys
from pathlib import Path
from timm_dcl.graph import Graph, Node

out, teacher_ckpt, student, teacher = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
out.mkdir(parents=True, exist_ok=True)
T, C = "through", "cutoff"
graphs = {
    # the student alone: labels only
    "alone": Graph([Node(student)], [[T]]),
    # KD from the frozen teacher at T = 2 and T = 4 (Hinton et al.)
    "kd-t2": Graph([Node(student), Node(teacher, checkpoint=teacher_ckpt)], [[T, T], [C, C]], temperature=2.0),
    "kd-t4": Graph([Node(student), Node(teacher, checkpoint=teacher_ckpt)], [[T, T], [C, C]], temperature=4.0),
    # DML of two students from scratch
    "dml": Graph([Node(student), Node(student)], [[T, T], [T, T]]),
    # DML with the teacher as a learning node, starting from its weights, fine-tuned at lr 0.01
    "dml-teacher": Graph([Node(student), Node(teacher, checkpoint=teacher_ckpt, lr=0.01)], [[T, T], [T, T]]),
    # the student and two peers, every one taught by the peers' ensemble (mean of their logits)
    "ensemble": Graph([Node(student), Node(student), Node(student), Node("ensemble", members=[1, 2])],
                      [[T, C, C, T], [C, T, C, T], [C, C, T, T], [C, C, C, C]], temperature=2.0),
}
for name, graph in graphs.items():
    graph.save(out / f"{name}.json")
print("graphs:", ", ".join(sorted(graphs)))
EOF

SEARCH=(--num-nodes 3 --target-model "$STUDENT" --candidates "$STUDENT,$TEACHER" --pretrained-dir "$OUT/pretrained"
        --temperature 2 --train-subset "$SUBSET" --val-size "$VAL" --epochs "$EPOCHS" --eval-every 10
        --min-resource 4 --reduction-factor 2 --sampler random --sampler-seed 0 --seed 0 --no-baselines
        --output "$OUT/search" "${RECIPE[@]}")

# 3. The pilot: two graphs over 3 seeds, then the number of seeds.
EXTRA_PILOT="alone=$G/alone.json,kd-t2=$G/kd-t2.json"
if [ ! -f "$OUT/pilot.json" ]; then
  part pilot workers "$PY" search_dcl.py "${SEARCH[@]}" --report --report-top 0 --report-seeds 3 \
    --report-graphs "$EXTRA_PILOT" --report-vs alone
  cp "$OUT/search/report.json" "$OUT/pilot_report.json"
  "$PY" - "$OUT" "$MAX_SEEDS" "$BUDGET_MIN" "$TIMINGS" "$TRIALS" "$EPOCHS" "$WORKERS" <<'EOF'
import csv, json, math, statistics, sys
from pathlib import Path
from timm_dcl.search.stats import t_quantile

out, max_seeds, budget_min, timings = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
trials, epochs, workers = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
rows = {r["name"]: r for r in json.loads((out / "pilot_report.json").read_text())}
alone, kd = rows["alone"], rows["kd-t2"]
sd_alone = statistics.stdev([v for v in alone["top1"] if v is not None])
sd_diff = statistics.stdev([a - b for a, b in zip(kd["top1"], alone["top1"]) if a is not None and b is not None])
# Conservative: the larger of the paired spread and one graph's own spread (3 seeds estimate
# either loosely), so that the interval of a 1.5-point difference would exclude 0.
sd = max(sd_alone, sd_diff)
need = next((n for n in range(2, 100) if t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= 1.5), 100)
# Cost: a run's training time in units of the student alone (one resnet20 ≈ 1, a frozen resnet32's
# forward ≈ 0.55, a learning resnet32 ≈ 1.67), from the pilot's own runs.
def seconds(run):
    return sum(json.loads(line)["time"] for line in (out / "search" / run / "metrics.jsonl").read_text().splitlines())
unit = statistics.fmean(seconds(r) for r in alone["runs"])
units = {"alone": 1, "kd-t2": 1.55, "kd-t4": 1.55, "dml": 2, "dml-teacher": 2.67, "ensemble": 3, "searched": 3}
# The workers train side by side (each single-threaded, as `unit` was measured), so wall time is
# the runs' time over the workers.
per_seed_min = unit * sum(units.values()) / 60 / workers
# The search still to come, in units: a 3-node trial costs about 3 per full run; ASHA (rungs 4, 8,
# 16, halving) trains every trial 4 epochs, half of them 8, a quarter 16, an eighth to the end.
search_units = 3 * (trials * (4 + 4 / 2 + 8 / 4) + trials / 8 * max(0, epochs - 16)) / epochs
pilot_s = sum(float(r["seconds"]) for r in csv.DictReader(open(timings), delimiter="\t") if r["part"] == "pilot")
spent_min = unit * search_units / 60 / workers + pilot_s / 60
done_min = unit * (units["alone"] + units["kd-t2"]) * 3 / 60 / workers  # the pilot's runs count in the report
afford = max(3, int((budget_min - spent_min + done_min) // per_seed_min))
seeds = max(3, min(need, max_seeds, afford))
half = t_quantile(0.975, seeds - 1) * sd / math.sqrt(seeds)
choice = {"sd_alone": sd_alone, "sd_paired_diff": sd_diff, "sd_used": sd, "seeds_needed": need,
          "seeds_affordable": afford, "max_seeds": max_seeds, "seeds": seeds, "half_width_at_choice": half,
          "alone_top1": alone["top1"], "kd_t2_top1": kd["top1"], "minutes_per_unit": unit / 60,
          "minutes_per_seed_all_graphs": per_seed_min}
(out / "pilot.json").write_text(json.dumps(choice, indent=2) + "\n")
md = [f"# Pilot", "", f"alone top-1 over 3 seeds: {', '.join(f'{v:.2f}' for v in alone['top1'])} "
      f"(sd {sd_alone:.2f}); kd-t2: {', '.join(f'{v:.2f}' for v in kd['top1'])}; paired kd-t2 − alone sd "
      f"{sd_diff:.2f}.", "",
      f"With sd {sd:.2f}, a 1.5-point difference is resolved at 95 % (t·sd/√n ≤ 1.5) from n = {need} seeds; "
      f"the budget affords {afford}, the cap is {max_seeds}: **{seeds} seeds** (interval half-width "
      f"≈ {half:.2f} points at that n).", "",
      f"One student-alone run took {unit / 60:.1f} min; all graphs of one seed ≈ {per_seed_min:.0f} min."]
(out / "pilot.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
fi

# 4. The short search (resumes where it stopped; a finished study trains nothing more).
if [ ! -f "$OUT/search/best_graph.json" ] || [ ! -f "$OUT/search.done" ]; then
  part search workers "$PY" search_dcl.py "${SEARCH[@]}" --n-trials "$TRIALS"
  touch "$OUT/search.done"
fi

# 5. Every graph over the chosen seeds (the pilot's runs are reused, not retrained).
SEEDS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['seeds'])" "$OUT/pilot.json")
EXTRA="$EXTRA_PILOT,kd-t4=$G/kd-t4.json,dml=$G/dml.json,dml-teacher=$G/dml-teacher.json,ensemble=$G/ensemble.json"
part "report ($SEEDS seeds)" workers "$PY" search_dcl.py "${SEARCH[@]}" --report --report-top 1 --report-seeds "$SEEDS" \
  --report-graphs "$EXTRA" --report-vs alone,kd-t2,dml
{
  cat "$OUT/search/report.md"
  echo
  cat "$OUT/pilot.md"
  echo
  echo "## Timings"
  echo
  echo '```'
  cat "$TIMINGS"
  echo '```'
} >"$OUT/evidence.md"
echo "evidence: $OUT/evidence.md"
