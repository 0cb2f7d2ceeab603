"""Make glibc's malloc keep freed memory for reuse (CPU training).

PyTorch's CPU allocator is plain malloc. With glibc's defaults every large
tensor (logits, activations) is mmap-ed when allocated and unmapped when
freed, so each step page-faults its whole working set again: measured here,
a third of a CPU training step was kernel time spent on page faults. Serving
all allocations from one arena that is never trimmed removes that after the
first step, at the price of the process keeping its peak footprint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Tune glibc malloc (no-op elsewhere); returns whether it applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int  # int mallopt(int, int)
    # M_TRIM_THRESHOLD = -1 disables trimming (mallopt(3)); values must fit a C int.
    settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: -1, _M_ARENA_MAX: 1, _M_TOP_PAD: 1 << 28}
    ok = all(mallopt(option, value) == 1 for option, value in settings.items())
    if not ok:
        logger.warning("could not tune glibc malloc; CPU steps may page-fault their working set")
    return ok
