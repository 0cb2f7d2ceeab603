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
    [ "${NGPU:-0}" -gt 0 ] || NGPU=1
fi
# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" ${TORCHRUN_ARGS:-} "$0" "$@"
":"""
"""Python entry point: started once per rank by torchrun."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    from titan_lrt.train import run

    run(sys.argv[1:])
