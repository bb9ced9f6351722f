#!/usr/bin/env bash
# The prepared GPU check for a lent H100/H200 (sm_90), under 8 minutes (≈ 160 s on an H100), from
# the repository root:
#
#     bash benchmarks/gpu.sh
#
# Needs torch, this repository and the mamba-ssm / causal-conv1d wheels built for sm_90 in .gpu/
# (not part of the repository; they travel beside the checkout to the lent machine). Without wheels
# there it uses mamba-ssm / causal-conv1d if they are already installed (the `cuda` extra).
# Steps, each with its own time limit: the wheels' own check (.gpu/check_gpu.py, if present: its
# result is reported, it never stops the rest), kernel parity, then the efficiency (1k → 22k
# tokens), train-step and scan benchmarks. Results go to $OUT (or outputs/gpu); the last lines
# printed are the summary: every step's exit status, the parity and efficiency summary lines, the
# train-step and scan tables. The write-up of the latest run is in BENCHMARKS.md.
set -u
if compgen -G ".gpu/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
  python3 -c "import mamba_ssm, causal_conv1d" \
    || { echo "no wheels in .gpu/ and mamba-ssm / causal-conv1d are not installed"; exit 1; }
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

check_rc=absent
if [ -f .gpu/check_gpu.py ]; then
  timeout 60 python3 .gpu/check_gpu.py 2>&1 | tail -n 3 | tee "$OUT/check_gpu.txt"
  check_rc=${PIPESTATUS[0]}
fi
timeout 60 python3 benchmarks/kernel_parity.py 2>&1 | tee "$OUT/parity.txt"
parity_rc=${PIPESTATUS[0]}
timeout 170 python3 benchmarks/efficiency.py --device cuda --sizes tiny base --batch 4 \
  --tokens 1024 2048 4096 8192 16384 22000 --repeats 3 --out "$OUT/efficiency" 2>&1 | tee "$OUT/efficiency.txt"
efficiency_rc=${PIPESTATUS[0]}
timeout 110 python3 benchmarks/train_step.py --device cuda --sizes tiny base --batch 8 2>&1 | tee "$OUT/train_step.txt"
train_rc=${PIPESTATUS[0]}
timeout 50 python3 benchmarks/scan.py --device cuda 2>&1 | tee "$OUT/scan.txt"
scan_rc=${PIPESTATUS[0]}

echo "---- summary (${SECONDS} s; results in $OUT)"
echo "exit status (124 = timed out): kernel_parity $parity_rc, efficiency $efficiency_rc, train_step $train_rc, scan $scan_rc;" \
  "check_gpu.py (supplied with the wheels) $check_rc"
if [ "$check_rc" != 0 ] && [ "$check_rc" != absent ]; then
  echo "check_gpu.py failed, last line: $(tail -n 1 "$OUT/check_gpu.txt")"
fi
grep -E "^[0-9]+ passed, [0-9]+ failed" "$OUT/parity.txt" \
  || echo "kernel parity: no 'N passed, M failed' line, last line: $(tail -n 1 "$OUT/parity.txt")"
grep -E "^[a-z]+ batch [0-9]+ at [0-9]+ tokens: SSAMBA" "$OUT/efficiency.txt" \
  || echo "efficiency: no summary lines, last line: $(tail -n 1 "$OUT/efficiency.txt")"
tail -n +2 "$OUT/train_step.txt"
tail -n +2 "$OUT/scan.txt"
# Our own steps decide the exit status; check_gpu.py does not.
[ "$parity_rc" = 0 ] && [ "$efficiency_rc" = 0 ] && [ "$train_rc" = 0 ] && [ "$scan_rc" = 0 ]
