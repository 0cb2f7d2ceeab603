"""What the checksums of complete.json cost: one rank's checkpoint file at the 1.3B model's size.

    python tools/bench_checksum.py                      # 1.3B params, 8 ranks, fp32 weights + AdamW moments
    python tools/bench_checksum.py --params 1.3e9 --ranks 8 --bytes-per-param 12 --folder /fast/disk

Writes one file of (params x bytes-per-param / ranks) bytes, as a rank's `__r_0.distcp` (with
fsync, as a save ends), reads it back (the load's read, page cache warm), and times
`titan_lrt.checkpoint.file_checksum` on it (and the CRC-32 of as many bytes in memory): the save
computes it once per file (rank 0, all files in parallel threads), the load verifies it once.
Prints each time and the checksum's
share of the write and of the read. The file is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib
from pathlib import Path

from titan_lrt.checkpoint import CHECKSUM, file_checksum

BLOCK = 64 * 2**20


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def write_file(path: Path, nbytes: int) -> None:
    block = os.urandom(BLOCK)  # incompressible; checksum speed does not depend on the bytes
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, BLOCK)])
        os.fsync(f.fileno())


def read_file(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(BLOCK):
            pass


def checksum_in_memory(nbytes: int) -> None:
    """The CRC-32 computation alone (no file reads): what a fast disk leaves of the cost."""
    block, crc, left = os.urandom(BLOCK), 0, nbytes
    while left > 0:
        crc = zlib.crc32(block[: min(left, BLOCK)], crc)
        left -= BLOCK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.3e9, help="model parameters (default: %(default)s)")
    parser.add_argument(
        "--ranks", type=int, default=8, help="ranks the checkpoint is sharded over (default: %(default)s)"
    )
    parser.add_argument(
        "--bytes-per-param",
        type=float,
        default=12,
        help="fp32 weights + two fp32 AdamW moments = 12 (default: %(default)s)",
    )
    parser.add_argument("--folder", default=None, help="where to write the file (default: the temp folder)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="checksum runs; the best is reported (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    nbytes = int(args.params * args.bytes_per_param / args.ranks)
    gb = nbytes / 1e9
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "__0_0.distcp"
        write_s, _ = timed(lambda: write_file(path, nbytes))
        read_s, _ = timed(lambda: read_file(path))
        sum_s = min(timed(lambda: file_checksum(path))[0] for _ in range(args.repeats))
    memory_s = min(timed(lambda: checksum_in_memory(nbytes))[0] for _ in range(args.repeats))
    print(f"one rank's file: {gb:.2f} GB ({args.params:.3g} params x {args.bytes_per_param:g} B / {args.ranks} ranks)")
    print(f"write + fsync   {write_s:7.2f} s  {gb / write_s:6.2f} GB/s")
    print(f"read (warm)     {read_s:7.2f} s  {gb / read_s:6.2f} GB/s")
    print(
        f"{CHECKSUM} (file)   {sum_s:7.2f} s  {gb / sum_s:6.2f} GB/s   "
        f"save +{100 * sum_s / write_s:.0f}%, load +{100 * sum_s / read_s:.0f}%"
    )
    print(f"{CHECKSUM} (memory) {memory_s:7.2f} s  {gb / memory_s:6.2f} GB/s   the computation alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
