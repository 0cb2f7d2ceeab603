#!/usr/bin/env bash
# One command for a single GPU (under 8 minutes on an H100/H200): tokens/s, MFU
# (counting the FLOPs each schedule really executes) and peak memory of the
# baseline and LRT S=2 at depth 12 and depth 20, bf16 autocast, torch.compile,
# with and without float8 (tensorwise). Each depth runs as one process so that
# the variants alternate and their ratios are measured side by side.
#   tools/bench_gpu.sh [out_dir]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_gpu_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"

python tools/bench_step.py --device cuda --depth 12 --vocab 32768 --seq-len 2048 --batch 8 --dtype bf16 \
    --variants baseline s2 --compile on --float8 both --rounds 6 --warmup 3 --json "$OUT/d12.json" \
    | tee "$OUT/d12.txt"
python tools/bench_step.py --device cuda --depth 20 --vocab 32768 --seq-len 2048 --batch 4 --dtype bf16 \
    --variants baseline s2 --compile on --float8 both --rounds 6 --warmup 3 --json "$OUT/d20.json" \
    | tee "$OUT/d20.txt"
