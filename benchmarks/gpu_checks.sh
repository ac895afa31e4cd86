#!/usr/bin/env bash
# Every GPU check of issue 5 in one script, for a session lent a GPU (see DEVELOPERS.md / the device tool):
#   bash benchmarks/gpu_checks.sh "$OUT"
# (1) bench.py on CUDA (ViT-B/16 and ResNet-50 at 224 px, ours vs eager fp32, JPEG end to end with CPU and nvJPEG
#     decoding, FLYP pairs/s, feature extraction, LP sweep vs scikit-learn); (2) the method scripts on the embedded world
#     with bf16 + compile, to check the default CUDA path runs end to end; (3) ft.py on a folder of JPEGs with
#     RFT_GPU_DECODE=1 (nvJPEG inside a real run). Budget: ~8 minutes on an H100. Nothing is downloaded.
set -uo pipefail
OUT=${1:-gpu-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
pip install -q -r requirements-dev.txt > "$OUT/pip.txt" 2>&1
export RFT_CACHE="$OUT/cache"
timeout 300 python bench.py --device cuda --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
python pretrain.py > "$OUT/pretrain.txt" 2>&1
for m in lp ft lpft flyp; do
  timeout 120 python "$m.py" --device cuda --out "$OUT/runs/$m" > "$OUT/$m.txt" 2>&1; echo "$m rc=$?" >> "$OUT/methods.txt"
done
tail -n 2 "$OUT"/*.txt
python - "$OUT/jpegs" <<'PY'
import sys, numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 40), ("test", 10), ("ood", 10)):
    for c in ("cat", "dog"):
        (Path(sys.argv[1]) / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(Path(sys.argv[1]) / split / c / f"{i}.jpg")
PY
RFT_GPU_DECODE=1 timeout 120 python ft.py --dataset folder --data-root "$OUT/jpegs" --backbone embedded-clip-tiny \
  --epochs 2 --batch-size 16 --device cuda --out "$OUT/runs/ft-gpu-decode" > "$OUT/ft-gpu-decode.txt" 2>&1
echo "ft gpu-decode rc=$?" >> "$OUT/methods.txt"
tail -n 2 "$OUT"/ft-gpu-decode.txt "$OUT"/methods.txt
