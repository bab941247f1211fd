#!/usr/bin/env bash
# --plan against launch, three times (issue 25; figures in RESULTS.md). From the repository root,
# on an otherwise idle machine, with real MNIST staged (default ../shared/data):
#   bash benchmarks/plan_check_runs.sh [OUT_DIR] [DATA_ROOT]
# Each run: --plan with an empty calibration cache, then the launch from empty directories.
set -u
out=${1:-plan-check-runs}
data=${2:-../shared/data}
sweep=sweeps/plan_check_mnist.yaml
mkdir -p "$out"
for i in 1 2 3; do
  cache=$(mktemp -d) res=$(mktemp -d)
  s=$(date +%s.%N)
  QSHIELD_PLAN_CACHE=$cache python -m qshield_dist.launch $sweep --data-root "$data" --plan > "$out/plan$i.txt" 2>&1
  echo "plan $i: rc $?, $(echo "$(date +%s.%N) - $s" | bc) s" >> "$out/times.txt"
  s=$(date +%s.%N)
  python -m qshield_dist.launch $sweep --data-root "$data" --results "$res/r" --checkpoints "$res/ck" > "$out/launch$i.txt" 2>&1
  echo "launch $i: rc $?, $(echo "$(date +%s.%N) - $s" | bc) s, load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/times.txt"
  rm -rf "$cache" "$res"
done
