#!/usr/bin/env bash
# Reproduce the ID/OOD summary table: every method x dataset x seed, skipping runs that already finished
# (a `done` marker in the run folder), then build the table from the results files.
#
#   bash run_all.sh                         # embedded world, seeds 0 1 2, two runs at a time
#   DATASETS="embedded" SEEDS="0" JOBS=1 bash run_all.sh
set -euo pipefail
cd "$(dirname "$0")"
DATASETS=${DATASETS:-embedded}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"lp ft lpft"}
JOBS=${JOBS:-2}   # parallel runs; each gets an equal share of the cores
ROOT=${ROOT:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}

for dataset in $DATASETS; do  # pretrain an embedded world's model once, before runs start in parallel
  python -c "import common, data; '$dataset' in data.WORLDS and common.load_backbone(data.WORLDS['$dataset'][1])"
done

pending=()
for dataset in $DATASETS; do
  for method in $METHODS; do
    for seed in $SEEDS; do
      out="$ROOT/$method/$dataset/seed$seed"
      if [ -f "$out/done" ]; then echo "skip $out (done)"; continue; fi
      pending+=("$method $dataset $seed $out")
    done
  done
done

run() {
  read -r method dataset seed out <<<"$1"
  mkdir -p "$out"
  echo "run  $out"
  python "$method.py" --dataset "$dataset" --seed "$seed" --out "$out" >"$out/log.txt" 2>&1 \
    || { echo "FAILED $out (see $out/log.txt)"; return 1; }
}
export -f run
if [ ${#pending[@]} -gt 0 ]; then
  printf '%s\n' "${pending[@]}" | xargs -P "$JOBS" -I{} bash -c 'run "$@"' _ {}
fi
python summarize.py "$ROOT"
