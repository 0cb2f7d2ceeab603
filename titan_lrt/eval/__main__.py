"""`python -m titan_lrt.eval`: see titan_lrt/eval/cli.py."""

import sys

from titan_lrt.eval.cli import main

sys.exit(main())
