"""Evaluate a trained checkpoint (the same as `python -m titan_lrt.eval`; see titan_lrt/eval/cli.py).

    python tools/evaluate.py --checkpoint outputs/debug_model/checkpoints/step-00000200 --icl --json eval.json
"""

import sys

from titan_lrt.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
