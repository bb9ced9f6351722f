#!/usr/bin/env bash
# The prepared GPU check for a lent H100/H200 (sm_90), under 8 minutes, needing only torch + ssamba:
# install the mamba-ssm / causal-conv1d wheels (carried in .gpu/, see the project's GPU notes),
# check kernel parity, then the scan, efficiency (1k → 22k tokens) and train-step benchmarks.
# Results go to $OUT (or outputs/gpu); the last lines printed are the summary.
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 .gpu/check_gpu.py 2>&1 | tail -3 | tee "$OUT/check_gpu.txt"
python3 benchmarks/kernel_parity.py 2>&1 | tee "$OUT/parity.txt"
timeout 90 python3 benchmarks/scan.py --device cuda 2>&1 | tee "$OUT/scan.txt"
timeout 200 python3 benchmarks/efficiency.py --device cuda --sizes tiny base --batch 4 \
  --tokens 1024 2048 4096 8192 16384 22000 --repeats 3 --out "$OUT/efficiency" 2>&1 | tee "$OUT/efficiency.txt"
timeout 120 python3 benchmarks/train_step.py --device cuda --sizes tiny base --batch 8 2>&1 | tee "$OUT/train_step.txt"
echo "---- summary"
tail -n 2 "$OUT/parity.txt"; grep -E "tokens:" "$OUT/efficiency.txt" | tail -n 4; tail -n 9 "$OUT/train_step.txt"
