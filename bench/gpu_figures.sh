#!/usr/bin/env bash
# Everything the performance issue asks a GPU for, in one short run (about 5 minutes on one GPU):
#   bash bench/gpu_figures.sh [OUT_DIR]
# 1. score_batch at 256x512 in fp32 and fp16, batch 1-32, beside the captum LayerGradCam loop;
# 2. one training epoch of the demo's U-Net on CUDA (synthetic scenes), its images/s.
# Writes one JSON line per measurement to OUT_DIR/gpu_figures.jsonl (default: bench/out) and prints them.
set -euo pipefail
out="${1:-bench/out}"
mkdir -p "$out"
python="${PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then  # a fresh machine: the project with the CUDA build of torch
  python3 -m venv .venv
  .venv/bin/pip install --quiet -e ".[dev]" -c constraints.txt
  python=.venv/bin/python
fi
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for precision in fp32 fp16; do
  "$python" bench/eem_throughput.py --device cuda --precision "$precision" --size 256 512 \
    --images 64 --batch-sizes 1 2 4 8 16 32 --rounds 3 | tee -a "$out/gpu_figures.jsonl"
done
"$python" -m jobs.train --config jobs/configs/demo.yaml --quiet --set name=gpu-epoch \
  --set output_dir="$out/gpu_runs" --set tracking.tracking_uri="sqlite:///$PWD/$out/gpu_mlflow.db" \
  --set data.root="$out/synthetic" --set train.device=cuda --set train.epochs=2 --set train.batch_size=16 \
  | tee -a "$out/gpu_figures.jsonl"
"$python" - "$out" <<'PY' | tee -a "$out/gpu_figures.jsonl"
import json, sqlite3, sys
db = sqlite3.connect(f"{sys.argv[1]}/gpu_mlflow.db")
rows = db.execute("select step, value from metrics where key = 'train/images_per_s' order by step").fetchall()
print(json.dumps({"training_images_per_s_by_epoch": rows, "note": "epoch 0 includes CUDA warm-up"}))
PY
