#!/usr/bin/env bash
# The prepared GPU check for a lent H100/H200 (sm_90), under 8 minutes (≈ 280 s on an H200), from the
# repository root:
#
#     bash benchmarks/gpu.sh
#
# Needs torch, this repository and the mamba-ssm / causal-conv1d wheels built for sm_90 in .gpu/
# (not part of the repository; they travel beside the checkout to the lent machine). Without wheels
# there it uses mamba-ssm / causal-conv1d if they are already installed (the `cuda` extra).
# Steps, each with its own time limit: kernel parity (kernels against the pure ops, and the lean
# encoder forward against the reference forward), the efficiency study in fp32 (tiny 1k → 22k
# tokens with the lean and the reference SSAMBA forward, eager and SDPA SSAST; base at three
# lengths), the inference-precision options (TF32, bf16) at 22k tokens, and the base pretraining
# step against SSAST-base (SDPA) up to the largest batch that fits, with a profile of one step.
# Results go to $OUT (or outputs/gpu); the last lines printed are the summary. The write-up of the
# latest run is in BENCHMARKS.md.
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

timeout 90 python3 benchmarks/kernel_parity.py 2>&1 | tee "$OUT/parity.txt"
parity_rc=${PIPESTATUS[0]}
timeout 110 python3 benchmarks/efficiency.py --device cuda --sizes tiny --batch 4 \
  --tokens 1024 2048 4096 8192 16384 22000 --repeats 3 --out "$OUT/eff_tiny" 2>&1 | tee "$OUT/efficiency.txt"
efficiency_rc=${PIPESTATUS[0]}
timeout 70 python3 benchmarks/efficiency.py --device cuda --sizes base --batch 4 --models ssamba ssamba-ref ssast-sdpa \
  --tokens 2048 8192 22000 --repeats 3 --out "$OUT/eff_base" 2>&1 | tee -a "$OUT/efficiency.txt"
base_rc=${PIPESTATUS[0]}
precision_rc=""
for precision in tf32 bf16; do
  timeout 30 python3 benchmarks/efficiency.py --device cuda --sizes tiny --batch 4 --precision $precision \
    --models ssamba ssast-eager ssast-sdpa --tokens 22000 --repeats 3 --out "$OUT/eff_$precision" 2>&1 | tee -a "$OUT/precision.txt"
  precision_rc="$precision_rc ${PIPESTATUS[0]}"
done
timeout 170 python3 benchmarks/pretrain_gpu.py --size base --batch 16 --max-batch 256 --profile --out "$OUT" 2>&1 \
  | tee "$OUT/pretrain.txt"
pretrain_rc=${PIPESTATUS[0]}

echo "---- summary (${SECONDS} s; results in $OUT)"
echo "exit status (124 = timed out): kernel_parity $parity_rc, efficiency tiny $efficiency_rc, base $base_rc," \
  "precision$precision_rc, pretrain $pretrain_rc"
grep -E "^(PASS|FAIL) lean|^[0-9]+ passed, [0-9]+ failed" "$OUT/parity.txt" \
  || echo "kernel parity: no 'N passed, M failed' line, last line: $(tail -n 1 "$OUT/parity.txt")"
grep -E "^[a-z]+ batch [0-9]+" "$OUT/efficiency.txt" \
  || echo "efficiency: no summary lines, last line: $(tail -n 1 "$OUT/efficiency.txt")"
grep -E "22000 tokens:" "$OUT/precision.txt"
grep -E "^  (ssamba|ssast)|^best|^at batch|^profile" "$OUT/pretrain.txt"
[ "$parity_rc" = 0 ] && [ "$efficiency_rc" = 0 ] && [ "$base_rc" = 0 ] && [ "$pretrain_rc" = 0 ]
