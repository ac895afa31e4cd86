#!/usr/bin/env bash
# Reproduce the ID/OOD summary table and pictures: every method x dataset x seed, skipping runs that already finished
# (a `done` marker in the run folder), then build the table (summarize.py) and the feature picture (feature_map.py).
#
#   bash run_all.sh                         # embedded world, seeds 0 1 2, all seven methods, two runs at a time
#   DATASETS="embedded" SEEDS="0" METHODS="lp ft" JOBS=1 bash run_all.sh
#   ROOT=runs-b bash run_all.sh             # another folder for the runs and the table (default: runs)
#
# A run counts as finished when its script wrote `done` (one whose script changed since is named; delete its `done` to
# run it again) with run_all.sh's settings: one made with others (a quick run by hand, --epochs 1) runs again, its
# files kept aside. An unfinished one goes on after its last finished epoch (or draw) where its script has --resume (FT,
# LP-FT, L2-SP, FLYP, few-shot FLYP) and it was started with run_all.sh's settings, else starts again; each attempt
# appends to its log.txt. METHODS may name a script of your own.
# WiSE-FT interpolates the zero-shot model and each seed's FLYP checkpoint, so it runs after FLYP finished (and again
# when FLYP was re-run). A failed run is named and the rest go on; the table covers what finished; the exit status is 1.
set -euo pipefail
cd "$(dirname "$0")"
DATASETS=${DATASETS:-embedded}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"zeroshot lp ft lpft l2sp flyp wiseft"}
JOBS=${JOBS:-2}   # parallel runs; each gets an equal share of the cores
ROOT=${ROOT:-runs}
# A typo in JOBS, SEEDS, DATASETS or METHODS stops here, not as one failed run per method and seed (JOBS=0 would
# start every run at once).
if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: JOBS has '$JOBS'; expected how many runs at a time, 1 or more" >&2; exit 2
fi
if [[ "$ROOT" =~ [[:space:]\"\'\\] ]]; then  # each planned run is one line of words: a space would split its folder
  echo "error: ROOT has '$ROOT'; expected a folder name without a space, quote or backslash" >&2; exit 2
fi
for seed in $SEEDS; do
  if ! [[ "$seed" =~ ^[0-9]+$ ]]; then
    echo "error: SEEDS has '$seed'; expected whole numbers, such as SEEDS=\"0 1 2\"" >&2; exit 2
  fi
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}

KNOWN="zeroshot lp ft lpft l2sp flyp flyp_fewshot wiseft"
for method in $METHODS; do  # ours, or a method script of your own beside them (a copy of ft.py, say)
  case " $KNOWN " in *" $method "*) ;; *) grep -qs "= common.setup(" "$method.py" ||
    { echo "error: METHODS has '$method'; choose from: $KNOWN (or <name>.py of your own, here)" >&2; exit 2; } ;; esac
done
# Then, in one python (imports take seconds): DATASETS and the RFT_* variables checked (RFT_CACHE, RFT_WORKERS,
# RFT_GPU_DECODE: said once, not once per run), an embedded world's model pretrained once before runs start in
# parallel, and the runs, finished or stopped, made with other settings than run_all.sh's (a quick one by hand, say)
# found: they run again, as the table holds the recipes' runs (common.why_run_again). Its output: one line each, the
# run's folder, a tab, why.
STALE=$(python -c "import importlib, sys
import data
root, seeds, datasets, methods = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
bad = [d for d in datasets if d not in data.DATASETS]
bad and print(f'error: DATASETS has {bad[0]!r}; choose from: {\", \".join(data.DATASETS)}', file=sys.stderr)
bad and sys.exit(2)
import common
try:
    common.check_environment()
except SystemExit as e:
    print(e, file=sys.stderr)
    sys.exit(2)
for d in datasets:  # its log on stderr: stdout is the list
    d in data.WORLDS and common.load_backbone(data.WORLDS[d][1], log=lambda msg: print(msg, file=sys.stderr))
for method in methods:
    try:
        module = importlib.import_module(method)
    except Exception:  # a script of one's own that does not import: its runs fail and say why
        continue
    for dataset in datasets:
        for seed in seeds:
            out = f'{root}/{\"wiseft-flyp\" if method == \"wiseft\" else method}/{dataset}/seed{seed}'
            why = common.why_run_again(out, module, dataset, int(seed))
            why and print(f'{out}\t{why}')" "$ROOT" "$SEEDS" "$DATASETS" "$METHODS")

# One line per pending run: script, run folder, extra arguments.
plan() {
  local phase=$1
  for dataset in $DATASETS; do
    for method in $METHODS; do
      for seed in $SEEDS; do
        if [ "$method" = wiseft ]; then phase_of=2; else phase_of=1; fi
        [ "$phase" = "$phase_of" ] || continue
        case "$method" in
          wiseft) line="wiseft $ROOT/wiseft-flyp/$dataset/seed$seed --checkpoint $ROOT/flyp/$dataset/seed$seed/model.pt" ;;
          ft|lpft|flyp) line="$method $ROOT/$method/$dataset/seed$seed --save" ;;  # checkpoints: WiSE-FT, pictures
          *) line="$method $ROOT/$method/$dataset/seed$seed" ;;
        esac
        read -r _ out _ <<<"$line"
        stale=$(grep -F "$out"$'\t' <<<"$STALE") || stale=""
        if [ -z "$stale" ] && [ ! -f "$out/done" ] && grep -qs "results.resume(" "$method.py"; then  # an interrupted
          line="$line --resume"  # run goes on after its last finished epoch (one redone starts afresh)
        fi
        endpoint="$ROOT/flyp/$dataset/seed$seed/model.pt"
        if [ "$method" = wiseft ] && [ -f "$out/done" ] && [ "$endpoint" -nt "$out/done" ]; then
          echo "redo $out (its FLYP checkpoint is newer)" >&2
        elif [ -n "$stale" ]; then
          echo "redo $out (${stale#*$'\t'}; its files are kept aside)" >&2
        elif [ -f "$out/done" ]; then  # not redone for an edited script (a comment, say), but said
          changed=""
          for file in "$method.py" common.py data.py; do [ "$file" -nt "$out/done" ] && changed="$changed, $file"; done
          echo "skip $out (done${changed:+; changed since: ${changed#, }: rm $out/done to run it again})" >&2; continue
        fi
        echo "$line --dataset $dataset --seed $seed"
      done
    done
  done
}

FAILED=$(mktemp); trap 'rm -f "$FAILED"' EXIT; export FAILED  # the run folders that failed, one per line
run() {
  read -r script out extra <<<"$1"
  echo "run  $out"
  { mkdir -p "$out" && python "$script.py" --out "$out" $extra >>"$out/log.txt" 2>&1 && [ -f "$out/done" ]; } ||
    { echo "FAILED $out (see $out/log.txt)"; echo "$out" >>"$FAILED"; }
}
export -f run

for phase in 1 2; do
  plan $phase | xargs -r -P "$JOBS" -I{} bash -c 'run "$@"' _ {}
done
python summarize.py "$ROOT" || echo "table not built" >>"$FAILED"
for dataset in $DATASETS; do  # the picture of the first seed's FT and LP-FT, drawn again only when one is newer
  ft="$ROOT/ft/$dataset/seed${SEEDS%% *}/model.pt" lpft="$ROOT/lpft/$dataset/seed${SEEDS%% *}/model.pt"
  picture="$ROOT/${dataset}_seed${SEEDS%% *}_feature_map.png"  # feature_map.py's name for it
  [ -f "$ft" ] && [ -f "$lpft" ] || continue
  if [ "$picture" -nt "$ft" ] && [ "$picture" -nt "$lpft" ]; then
    echo "skip $picture (newer than its checkpoints)" >&2
  else
    python feature_map.py --dataset "$dataset" --seed "${SEEDS%% *}" --root "$ROOT" || echo "$picture" >>"$FAILED"
  fi
done
if [ -s "$FAILED" ]; then
  echo "error: $(wc -l <"$FAILED") step(s) failed; each run's log.txt says why, and a rerun redoes only what is missing:" >&2
  sed 's/^/  /' "$FAILED" >&2
  exit 1
fi
