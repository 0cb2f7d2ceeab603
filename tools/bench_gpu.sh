#!/usr/bin/env bash
# One command for a single GPU (under 8 minutes on an H100/H200), one table at the end:
#   training: the baseline and LRT S=2 at depth 12 and 20, bf16 autocast, torch.compile,
#     float8 (tensorwise) off and on -- tokens/s, MFU in both conventions (ours: the
#     FLOPs executed, causal attention as half; published: nanochat's and torchtitan's
#     6N + 12 L H Q T) and peak memory. Each depth is one process in which the
#     variants alternate, so their ratios are measured side by side.
#   decoding: baseline and LRT at depth 12, bf16, compiled decode step, batch 1 and 8 (then, after the
#     table, the same with CUDA graphs: decode_cuda_graphs.txt).
#
#   tools/bench_gpu.sh [out_dir]          # on the GPU machine
#   DRY_RUN=1 tools/bench_gpu.sh [out]    # on CPU: tiny sizes, eager, emulated float8 (checks the plumbing)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_gpu_out}"
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    DEVICE=cpu COMPILE=off
    SIZES=("12:--dim 64 --n-layers 2 --n-heads 2 --seq-len 64 --batch 2" "20:--dim 64 --n-layers 3 --n-heads 2 --seq-len 64 --batch 2")
    TIMING="--rounds 1 --warmup 0" DECODE="--config train_configs/debug_model.toml --dims 64 --vocab 512 --prompt-len 8 --new-tokens 4 --rounds 1 --warmup 0"
else
    DEVICE=cuda COMPILE=on
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    SIZES=("12:--depth 12 --seq-len 2048 --batch 8" "20:--depth 20 --seq-len 2048 --batch 4")
    TIMING="--rounds 6 --warmup 3" DECODE="--config train_configs/lrt_d12.toml --dims 0 --vocab 32768 --prompt-len 64 --new-tokens 128 --rounds 5 --warmup 1 --compile"
fi

for size in "${SIZES[@]}"; do
    depth="${size%%:*}"
    # shellcheck disable=SC2086  # the option strings split into arguments on purpose
    python tools/bench_step.py --device "$DEVICE" ${size#*:} --vocab 32768 --dtype bf16 --variants baseline s2 \
        --compile "$COMPILE" --float8 both $TIMING --json "$OUT/d$depth.json" | tee "$OUT/d$depth.txt"
done
# shellcheck disable=SC2086
python tools/bench_decode.py --device "$DEVICE" --dtype bf16 --batch 1 8 \
    $DECODE --json "$OUT/decode.json" | tee "$OUT/decode.txt"

python - "$OUT" <<'PY' | tee "$OUT/table.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
fmt = lambda x, spec: "-" if x is None else format(x, spec)
print(f"\n{'depth':>5} {'model':<9}{'float8':>7}{'tok/s':>11}{'MFU ours %':>11}{'MFU pub %':>10}{'peak GiB':>9}")
for depth in (12, 20):
    for r in json.loads((out / f"d{depth}.json").read_text()):
        print(f"{depth:>5} {('LRT S=2' if r['variant'] == 's2' else r['variant']):<9}"
              f"{('on' if r['setting'].endswith('float8') else 'off'):>7}{r['tokens_per_s']:>11,.0f}"
              f"{fmt(r['mfu_pct'], '.1f'):>11}{fmt(r['mfu_published_pct'], '.1f'):>10}{r['peak_mib'] / 1024:>9.2f}")
print(f"\n{'decode':<15}{'batch':>6}{'baseline tok/s':>16}{'LRT tok/s':>11}{'LRT/base':>9}")
for r in json.loads((out / "decode.json").read_text()):
    print(f"{'depth 12':<15}{r['batch']:>6}{r['baseline_tokens_per_s']:>16,.1f}{r['lrt_tokens_per_s']:>11,.1f}"
          f"{r['lrt_tokens_per_s'] / r['baseline_tokens_per_s']:>9.3f}")
PY

if [[ "${DRY_RUN:-0}" != 1 ]]; then
    # CUDA-graph decoding (opt-in in the library): after the table, so that a failure here costs nothing above
    # shellcheck disable=SC2086
    python tools/bench_decode.py --device "$DEVICE" --dtype bf16 --batch 1 8 $DECODE --cuda-graphs \
        | tee "$OUT/decode_cuda_graphs.txt" || echo "CUDA-graph decoding failed (see above)"
fi
