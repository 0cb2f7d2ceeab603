"""The embedded default corpus: the Python standard library's own source files.

Every Python installation carries these files, so a debug run needs neither a
network nor a download. One document per `.py` file (read as UTF-8, undecodable
bytes replaced), in sorted order of the path relative to the stdlib directory.
A file goes to the validation split when a stable hash of its relative path
falls below `validation_fraction` (at least one file always does), so the split
of a file never depends on which other files exist.

Layout written (parquet, columns `path` and `text`, loadable by
`datasets.load_dataset`, which reads the split from the file names):

    train-00000-of-00004.parquet ... validation-00000-of-00001.parquet
    manifest.json   python version, build options, per-split file counts,
                    UTF-8 bytes and sha256 of the contents

The build goes to a temporary sibling directory that is renamed into place at
the end, so a directory with a manifest is always complete; building again
where a complete build exists does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sysconfig
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

MANIFEST_NAME = "manifest.json"
_EXCLUDED_DIRS = {"site-packages", "dist-packages"}
# Options that change the content of a build; a complete build made with other
# values is reported instead of being silently reused.
_BUILD_OPTIONS = ("max_files", "validation_fraction", "num_train_shards")


def stdlib_source_files(stdlib_dir: str | Path | None = None) -> list[str]:
    """Sorted POSIX paths, relative to `stdlib_dir`, of the stdlib's `.py` files."""
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib directory {str(root)!r} does not exist")
    paths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        paths.append(rel.as_posix())
    return sorted(paths)


def path_hash_fraction(rel_path: str) -> float:
    """A number in [0, 1) fixed by the path alone: the split key of a file."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_paths(paths: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) by path hash; moves the lowest-hash file to validation if none is."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    if len(paths) < 2:
        raise ValueError(f"need at least 2 files for a train and a validation split, got {len(paths)}")
    keys = {p: path_hash_fraction(p) for p in paths}
    validation = {p for p in paths if keys[p] < validation_fraction}
    if not validation:
        validation = {min(paths, key=keys.__getitem__)}
    if len(validation) == len(paths):
        validation.discard(max(paths, key=keys.__getitem__))
    return [p for p in paths if p not in validation], [p for p in paths if p in validation]


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a complete build at `path`, or None if there is none."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    shards = [name for split in manifest["splits"].values() for name in split["shards"]]
    if not all((Path(path) / name).is_file() for name in shards):
        return None
    return manifest


def ensure_stdlib_corpus(
    path: str | Path,
    *,
    max_files: int | None = None,
    validation_fraction: float = 0.02,
    num_train_shards: int = 4,
    stdlib_dir: str | Path | None = None,
    show_progress: bool = True,
) -> Path:
    """Build the stdlib corpus at `path` unless a complete build is there; return `path`.

    `max_files` keeps only the first files in sorted order (a fast sample for
    tests). Raises if `path` holds a complete build made with other options, or
    holds something that is not a corpus build.
    """
    out = Path(path)
    options = {
        "max_files": max_files,
        "validation_fraction": validation_fraction,
        "num_train_shards": num_train_shards,
    }
    if max_files is not None and (not isinstance(max_files, int) or max_files < 2):
        raise ValueError(f"max_files must be None or an integer >= 2, got {max_files!r}")
    if not isinstance(num_train_shards, int) or num_train_shards < 1:
        raise ValueError(f"num_train_shards must be an integer >= 1, got {num_train_shards!r}")
    existing = _existing_build(out, options)
    if existing is not None:
        return existing

    paths = stdlib_source_files(stdlib_dir)
    if max_files is not None:
        paths = paths[:max_files]
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    train, validation = split_paths(paths, validation_fraction)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with tqdm(total=len(paths), desc="stdlib corpus", unit="file", disable=not show_progress) as bar:
            splits = {
                "train": _write_split(tmp, "train", train, root, num_train_shards, bar),
                "validation": _write_split(tmp, "validation", validation, root, 1, bar),
            }
        manifest = {
            "python_version": platform.python_version(),
            "stdlib_dir": str(root),
            **options,
            "splits": splits,
            "sha256": hashlib.sha256("".join(splits[name]["sha256"] for name in sorted(splits)).encode()).hexdigest(),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _existing_build(out, options)  # a concurrent builder may have won with other options
    return out


def _existing_build(out: Path, options: dict) -> Path | None:
    if not out.exists():
        return None
    manifest = read_manifest(out)
    if manifest is None:
        if out.is_dir() and not any(out.iterdir()):
            return None
        raise FileExistsError(
            f"{str(out)!r} exists but holds no complete corpus build (no valid {MANIFEST_NAME}); "
            "remove it or choose another path"
        )
    for key in _BUILD_OPTIONS:
        if manifest.get(key) != options[key]:
            raise ValueError(
                f"corpus at {str(out)!r} was built with {key}={manifest.get(key)!r}, "
                f"but {key}={options[key]!r} was asked; remove it or choose another path"
            )
    return out


def _write_split(tmp: Path, split: str, paths: list[str], root: Path, num_shards: int, bar: tqdm) -> dict:
    """Write `paths` as parquet shards of one split; return its manifest entry."""
    num_shards = min(num_shards, len(paths))
    digest = hashlib.sha256()
    total_bytes = 0
    shard_names = []
    bounds = [len(paths) * i // num_shards for i in range(num_shards + 1)]
    for shard in range(num_shards):
        shard_paths = paths[bounds[shard] : bounds[shard + 1]]
        texts = []
        for rel in shard_paths:
            text = (root / rel).read_bytes().decode("utf-8", errors="replace")
            data = text.encode("utf-8")
            # Length-prefixed, so that no two different corpora hash alike.
            digest.update(f"{len(rel)}:{len(data)}:".encode() + rel.encode() + data)
            total_bytes += len(data)
            texts.append(text)
            bar.update(1)
        name = f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
        pq.write_table(pa.table({"path": shard_paths, "text": texts}), tmp / name)
        shard_names.append(name)
    return {"files": len(paths), "bytes": total_bytes, "sha256": digest.hexdigest(), "shards": shard_names}


def _move_into_place(tmp: Path, out: Path) -> None:
    """Atomic rename; if a concurrent builder won the race, keep its build."""
    try:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.rename(tmp, out)
    except OSError:
        if read_manifest(out) is None:
            raise
