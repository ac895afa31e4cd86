#!/usr/bin/env bash
# Every GPU check of issue 5 in one script, for a session lent a GPU (the developers' guide, the device tool). In
# order of what a time-out may cut last:
#   (1) bench.py on CUDA, three parts with caps of their own (issue 5's targets): CLIP ViT-B/16 training ours vs
#       eager fp32 (synthetic, then JPEG with worker and nvJPEG decoding) and feature extraction; the LP sweep vs
#       scikit-learn; FLYP pairs/s. profile.txt: torch.profiler's table of five more ViT-B/16 steps of our path, the
#       kernels with the most GPU time first (the "why" of a missed target, from the same call); bench.py rewrites
#       its JSON after each cell;
#   (2) lp / ft / lpft / l2sp / flyp, then wiseft of that FLYP run and feature_map.py of the FT and LP-FT runs, on
#       the tiny embedded world with the CUDA defaults (bf16 autocast + torch.compile), to check that the default path
#       runs end to end (speed is bench.py's job), with torch.compile's recompilations and their reasons (expected:
#       one per compiled tower, training -> evaluation, 'grad_mode'); then ft.py on a folder of JPEGs with
#       RFT_GPU_DECODE=1 (nvJPEG inside a real run, one CMYK JPEG among them; and whether nvJPEG refuses that
#       file or decodes it, to PIL's colours or not);
#   (3) bench.py's ResNet-50 rows (bench-resnet50.json; the table goes on in bench.txt);
#   (4) benchmarks/lp_solver.py: LP's solver now (scipy L-BFGS-B, torch's loss and gradient on the GPU) against the
#       torch.optim.LBFGS it replaced and scikit-learn, with the GPU syncs each makes (appended to bench.txt);
#   (5) ft.py stopped and resumed (--resume) on CUDA against (2)'s run that never stopped (methods.txt);
#   (6) benchmarks/resume_write.py on CUDA: how long the loop waits for resume.pt's device-to-host copy, against
#       writing it in the loop (appended to bench.txt).
#
# The device machine has PyTorch, torchvision, scikit-learn, timm and friends but no open_clip and no network. Fetch
# the missing pure-Python wheels here first (the folder stays out of git), then carry it:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: -d .whl open_clip_torch==3.3.0 ftfy wcwidth
#   device run, carry [".whl"], timeout_s 580:  bash benchmarks/gpu_checks.sh "$OUT"
# Budget: the whole script stops itself within $BUDGET seconds (default 540, under that timeout_s, so every file
# comes back): each check gets what is left, up to its own cap, and is skipped when under 15 s are left.
# The machine's start counts against the session's 15 minutes, so this is one call by design: no time is left for a
# second. $OUT receives 7 small files (the device tool returns at most 8: a bench JSON's temporary file, left by a
# time-out, may be the eighth): methods.txt (the environment first), bench.txt, profile.txt and bench*.json. Scratch
# (model cache, runs, JPEGs) stays in $WORK.
set -uo pipefail
mkdir -p "${1:-gpu-out}" && OUT=$(cd "${1:-gpu-out}" && pwd)  # absolute: the script changes directory below
WORK=${WORK:-/tmp/rft-gpu}
DEADLINE=$((SECONDS + ${BUDGET:-540}))
mkdir -p "$WORK"
cd "$(dirname "$0")/.." || exit 1
PY=$(command -v python3 || command -v python)

limit() {  # seconds for the next check: its cap ($1) or what is left of the budget, whichever is less; 0 = skip it
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

if [ -d .whl ]; then
  "$PY" -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export RFT_CACHE="$WORK/cache" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'open_clip', open_clip.__version__, torch.cuda.get_device_name())"; nproc; df -h /dev/shm; } > "$OUT/methods.txt" 2>&1
cat "$OUT/methods.txt"
"$PY" -c "import open_clip" 2>/dev/null || { echo "error: no open_clip here: run with carry [\".whl\"] (see above)" \
  | tee -a "$OUT/methods.txt"; exit 1; }

# (1) The benchmark's ViT-B/16, LP and FLYP cells, each part with a cap of its own (a slow compile in one must not
# cost the others their numbers): the table goes to bench.txt, the JSON to bench.json, bench-lp.json, bench-flyp.json.
t=$(limit 200)  # (each check tests t first: `timeout 0` would mean no limit)
[ "$t" -gt 0 ] && timeout -k 5 "$t" "$PY" bench.py --device cuda --only clip-vit-b16 --out "$OUT/bench.json" \
  --profile "$OUT/profile.txt" 2>&1 | tee "$OUT/bench.txt"
t=$(limit 90)  # scikit-learn's sweep on the CPU is most of it
[ "$t" -gt 0 ] && timeout -k 5 "$t" "$PY" bench.py --device cuda --only lp --out "$OUT/bench-lp.json" 2>&1 \
  | tee -a "$OUT/bench.txt"
t=$(limit 150)  # both towers compiled
[ "$t" -gt 0 ] && timeout -k 5 "$t" "$PY" bench.py --device cuda --only flyp --out "$OUT/bench-flyp.json" 2>&1 \
  | tee -a "$OUT/bench.txt"

# (2) The method scripts with the CUDA defaults, timed; the last lines of each log go to methods.txt.
t=$(limit 40)
[ "$t" -gt 0 ] && timeout -k 5 "$t" "$PY" -c "import common; common.load_backbone('embedded-clip-tiny')" \
  > "$WORK/pretrain.txt" 2>&1
for m in lp ft lpft l2sp flyp wiseft; do  # run_all.sh's layout, so that feature_map.py finds the checkpoints
  case $m in ft|lpft|flyp) extra=(--save) ;; wiseft) extra=(--checkpoint "$WORK/runs/flyp/embedded-tiny/seed0/model.pt") ;;
    *) extra=() ;; esac
  t=$(limit "$([ $m = flyp ] && echo 70 || echo 45)")  # FLYP compiles three graphs: both towers, and the head's
  if [ "$t" -eq 0 ]; then echo "== $m.py skipped: the budget was spent" >> "$OUT/methods.txt"; continue; fi
  start=$SECONDS
  TORCH_LOGS=recompiles timeout -k 5 "$t" "$PY" "$m.py" --dataset embedded-tiny --device cuda \
    --out "$WORK/runs/$m/embedded-tiny/seed0" "${extra[@]}" > "$WORK/$m.txt" 2>&1
  rc=$?
  { echo "== $m.py rc=$rc $((SECONDS - start)) s, $(grep -c 'Recompiling function' "$WORK/$m.txt") recompilations"
    sed -n 's/.*\[__recompiles\] *- /  because /p' "$WORK/$m.txt"
    if [ $rc -eq 0 ]; then grep "^\[$m" "$WORK/$m.txt" | tail -n 3; else tail -n 5 "$WORK/$m.txt"; fi
  } >> "$OUT/methods.txt"
done
ckpt="$WORK/runs/ft/embedded-tiny/seed0/model.pt"  # saved on the GPU: its tensors must be on the CPU
[ -f "$ckpt" ] && "$PY" -c "import sys, torch; sd = torch.load(sys.argv[1], weights_only=True)['state_dict']
print('== ft model.pt tensors on', sorted({str(v.device) for v in sd.values()}))" "$ckpt" >> "$OUT/methods.txt" 2>&1
t=$(limit 40)  # the feature picture, its features computed on the GPU
if [ "$t" -gt 0 ]; then
  timeout -k 5 "$t" "$PY" feature_map.py --dataset embedded-tiny --root "$WORK/runs" --device cuda \
    > "$WORK/feature_map.txt" 2>&1
  rc=$?
  echo "== feature_map.py rc=$rc $(tail -n 1 "$WORK/feature_map.txt")" >> "$OUT/methods.txt"
else
  echo "== feature_map.py skipped: the budget was spent" >> "$OUT/methods.txt"
fi

# nvJPEG inside a real run: a small folder dataset of JPEGs, decoded on the GPU; one is CMYK, as ~22 of ImageNet's.
"$PY" - "$WORK/jpegs" <<'PY'
import sys, numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 40), ("test", 10), ("ood", 10)):
    for c in ("cat", "dog"):
        (Path(sys.argv[1]) / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
            (image.convert("CMYK") if (split, c, i) == ("train", "cat", 0) else image).save(
                Path(sys.argv[1]) / split / c / f"{i}.jpg")
PY
# Does nvJPEG refuse the CMYK JPEG (then data.py decodes it on the CPU), or decode it, and to PIL's colours?
t=$(limit 30)
[ "$t" -gt 0 ] || echo "== the CMYK JPEG check skipped: the budget was spent" >> "$OUT/methods.txt"
[ "$t" -gt 0 ] && timeout -k 5 "$t" "$PY" - "$WORK/jpegs/train/cat/0.jpg" >> "$OUT/methods.txt" 2>&1 <<'PY'
import sys, numpy as np, torch
from PIL import Image
from torchvision import io
ref = torch.from_numpy(np.array(Image.open(sys.argv[1]).convert("RGB"))).permute(2, 0, 1).int()
for device in ("cpu", "cuda"):
    try:
        image = io.decode_jpeg(io.read_file(sys.argv[1]), mode=io.ImageReadMode.RGB, device=device).cpu().int()
        print(f"== CMYK JPEG decoded on {device}: max |decoded - PIL| = {(image - ref).abs().max().item()} grey levels")
    except RuntimeError as e:
        print(f"== CMYK JPEG refused on {device}: {str(e).splitlines()[0]}")
PY
t=$(limit 40)
if [ "$t" -gt 0 ]; then
  RFT_GPU_DECODE=1 timeout -k 5 "$t" "$PY" ft.py --dataset folder --data-root "$WORK/jpegs" \
    --backbone embedded-clip-tiny --epochs 2 --batch-size 16 --device cuda --out "$WORK/runs/ft-gpu-decode" \
    > "$WORK/ft-gpu-decode.txt" 2>&1
  rc=$?
  { echo "== ft.py RFT_GPU_DECODE=1 rc=$rc"; grep -i "refused" "$WORK/ft-gpu-decode.txt"
    tail -n 3 "$WORK/ft-gpu-decode.txt"; } >> "$OUT/methods.txt"
else
  echo "== ft.py RFT_GPU_DECODE=1 skipped: the budget was spent" >> "$OUT/methods.txt"
fi
cat "$OUT/methods.txt"

# (3) The benchmark's ResNet-50 rows (a time-out keeps the cells already written to bench-resnet50.json).
t=$(limit 150)
if [ "$t" -gt 0 ]; then
  timeout -k 5 "$t" "$PY" bench.py --device cuda --only resnet50 --out "$OUT/bench-resnet50.json" 2>&1 \
    | tee -a "$OUT/bench.txt"
else
  echo "ResNet-50 skipped: the budget was spent" | tee -a "$OUT/bench.txt"
fi

# (4) LP's solver, before and after (about 20 s of scikit-learn on the CPU, the rest seconds).
t=$(limit 90)
if [ "$t" -gt 0 ]; then
  echo "== benchmarks/lp_solver.py --device cuda" | tee -a "$OUT/bench.txt"
  timeout -k 5 "$t" "$PY" benchmarks/lp_solver.py --device cuda 2>&1 | grep --line-buffered -v "^USDT\|^ERROR:\|^STAGE:" \
    | tee -a "$OUT/bench.txt"
else
  echo "== benchmarks/lp_solver.py skipped: the budget was spent" | tee -a "$OUT/bench.txt"
fi
# (5) --resume on CUDA: ft.py stopped in its last epoch and resumed, against (2)'s run that never stopped.
t=$(limit 45)
if [ "$t" -gt 0 ]; then
  timeout -k 5 "$t" "$PY" - "$WORK/runs" > "$WORK/resume.txt" 2>&1 <<'PY'
import json, sys, torch
import common, ft
runs = sys.argv[1]
progress, out = common.progress, f"{runs}/ft-resume"
def stop(iterable, desc="", total=None):
    if desc == "epoch 2/2":
        raise KeyboardInterrupt
    return progress(iterable, desc, total)
common.progress = stop
try:
    ft.main(ft.Args(dataset="embedded-tiny", device="cuda", out=out, save=True))
except KeyboardInterrupt:
    pass
common.progress = progress
ft.main(ft.Args(dataset="embedded-tiny", device="cuda", out=out, save=True, resume=True))
def computed(folder):
    lines = [(r["step"], r["metrics"], r.get("train_loss")) for r in map(json.loads, open(f"{folder}/results.jsonl"))]
    return lines, torch.load(f"{folder}/model.pt", weights_only=True)["state_dict"]
(a, wa), (b, wb) = computed(out), computed(f"{runs}/ft/embedded-tiny/seed0")
def numbers(lines):  # each line's train loss and metrics, in order (cuDNN's autotuned kernels may differ by a rounding)
    return [v for _, metrics, loss in lines for v in [loss or 0.0, *(metrics[k] for k in sorted(metrics))]]
gap = max((abs(x - y) for x, y in zip(numbers(a), numbers(b))), default=float("nan"))
print(f"== ft.py stopped and resumed on cuda: results lines equal {a == b} (steps equal "
      f"{[s for s, *_ in a] == [s for s, *_ in b]}, largest difference of a loss or metric {gap:.3g}); "
      f"max |w - w_whole| {max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa):.3g}")
PY
  if [ $? -eq 0 ]; then grep "^== " "$WORK/resume.txt"; else echo "== ft.py --resume on cuda failed:"
    tail -n 5 "$WORK/resume.txt"; fi | tee -a "$OUT/methods.txt"
else
  echo "== ft.py --resume on cuda skipped: the budget was spent" | tee -a "$OUT/methods.txt"
fi
# (6) resume.pt written in the background from a GPU's state (ViT-B/16 + fused AdamW, 2.4 GB; four epochs' ends).
t=$(limit 90)
if [ "$t" -gt 0 ]; then
  echo "== benchmarks/resume_write.py ViT-B-16 cuda" | tee -a "$OUT/bench.txt"
  timeout -k 5 "$t" "$PY" benchmarks/resume_write.py ViT-B-16 cuda 2>&1 | grep -v "^WARNING" | tee -a "$OUT/bench.txt"
else
  echo "== benchmarks/resume_write.py skipped: the budget was spent" | tee -a "$OUT/bench.txt"
fi
rm -f "$OUT"/*.tmp[0-9]*  # a bench JSON's temporary file that a time-out left: one file fewer to bring back
echo "gpu_checks.sh: done in $SECONDS s; in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
