#!/usr/bin/env bash
""":"
# titan_lrt launcher: this file is both a shell script and a Python program.
#   ./run_train.sh --config FILE [--section.key=value ...]      (shell: starts torchrun)
#   torchrun ... run_train.sh --config FILE                     (Python: the trainer)
#   torchrun --no-python ... run_train.sh --config FILE         (shell under torchrun: the trainer)
set -eu
PYTHON="${PYTHON:-python3}"
if [ -n "${TORCHELASTIC_RUN_ID:-}" ] || [ -n "${LOCAL_RANK:-}" ]; then
    exec "$PYTHON" "$0" "$@"
fi
if [ -z "${NGPU:-}" ]; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # the GPUs this job may use (e.g. SLURM, docker)
        VISIBLE=$(printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
        if [ "$VISIBLE" -lt "${NGPU:-0}" ]; then NGPU=$VISIBLE; fi
    fi
    [ "${NGPU:-0}" -gt 0 ] || NGPU=1
fi
# torchrun inside Python (titan_lrt/launcher.py): the trainer's message is the last line, its exit code ours
# shellcheck disable=SC2086
exec "$PYTHON" "$0" --torchrun --standalone --nproc_per_node="$NGPU" ${TORCHRUN_ARGS:-} "$0" "$@"
":"""
"""Python entry point: started once per rank by torchrun (or, with --torchrun first, as torchrun)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    if sys.argv[1:2] == ["--torchrun"]:
        from titan_lrt.launcher import torchrun

        sys.exit(torchrun(sys.argv[2:]))
    from titan_lrt.train import run

    run(sys.argv[1:])
