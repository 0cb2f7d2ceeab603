"""Build the embedded default corpus from this Python's standard library sources.

    python tools/build_corpus.py --out assets/stdlib_corpus

Does nothing when a complete build is already there (see titan_lrt/data/corpus.py).
"""

from __future__ import annotations

import argparse
import time

from titan_lrt.data.corpus import ensure_stdlib_corpus, read_manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/stdlib_corpus", help="output directory (default: %(default)s)")
    parser.add_argument("--max-files", type=int, default=None, help="keep only the first N files in sorted order")
    parser.add_argument("--validation-fraction", type=float, default=0.02, help="default: %(default)s")
    parser.add_argument("--num-train-shards", type=int, default=4, help="default: %(default)s")
    parser.add_argument("--stdlib-dir", default=None, help="default: this interpreter's stdlib")
    args = parser.parse_args(argv)

    already = read_manifest(args.out) is not None
    start = time.perf_counter()
    path = ensure_stdlib_corpus(
        args.out,
        max_files=args.max_files,
        validation_fraction=args.validation_fraction,
        num_train_shards=args.num_train_shards,
        stdlib_dir=args.stdlib_dir,
    )
    manifest = read_manifest(path)
    splits = ", ".join(
        f"{name}: {s['files']} files, {s['bytes'] / 1e6:.1f} MB" for name, s in manifest["splits"].items()
    )
    verb = "already built" if already else f"built in {time.perf_counter() - start:.1f} s"
    print(f"{path}: {verb} (Python {manifest['python_version']}; {splits})")


if __name__ == "__main__":
    main()
