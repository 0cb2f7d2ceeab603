"""Where documents come from: local parquet / jsonl / json / txt, or a hub dataset.

One entry point, `load_documents`, turns what a user names into a Hugging Face
dataset plus the name of its text column:

- an existing file, or a list of files: the builder follows the extension
  (`.parquet`, `.jsonl`/`.json`, `.txt`); the files are the split you ask for;
- an existing directory: its data files (searched recursively, hidden ones
  skipped) in one format; if several formats are present, the first of parquet,
  json(l), txt wins (so a `manifest.json` or a `README.txt` beside parquet
  shards is ignored); files go to splits by the `datasets` naming rules
  (`train-00000-of-00004.parquet`, `validation.jsonl`, a `test/` folder, ...),
  and all files are `train` when no name says otherwise;
- any other string: a hub dataset, opened with `streaming=True`, and only when
  `streaming=True` is passed, so that no default touches the network;
- an already loaded `datasets.Dataset` / `IterableDataset` (tests, synthetic data).

Local sources load map-style (random access, known length) unless
`streaming=True`. For `.txt`, `txt_sample_by` says what a document is: a whole
file (`"document"`, the default), a paragraph, or a line.

Bad data raises `DataError`, one line that names the file, line or row, or the
column, and the fix: up front where `datasets` reads the files when it opens
them (a malformed jsonl line, non-UTF-8 text), else at the row that fails (text
bytes that are not UTF-8 inside a jsonl string load, and fail when read).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.exceptions import DatasetGenerationError

# builder name -> file extensions, in order of precedence inside a directory
FORMATS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet",),
    "json": (".jsonl", ".json"),
    "text": (".txt",),
}
TXT_SAMPLE_BY = ("document", "paragraph", "line")
_ALL_EXTENSIONS = tuple(ext for exts in FORMATS.values() for ext in exts)
_FIX_ENCODING = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the line"


class DataError(ValueError):
    """Bad user data: the message is one line naming the file, line, row or column, and the fix."""


class MissingColumnError(DataError, KeyError):
    """The text column is not in the data (a KeyError too, as a missing key is)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ColumnTypeError(DataError, TypeError):
    """The text column holds something other than strings."""


@dataclass(frozen=True)
class Documents:
    """A split of documents: the dataset, its text column, a name for messages and its local files."""

    dataset: datasets.Dataset | datasets.IterableDataset
    text_column: str
    name: str
    files: tuple[str, ...] = ()  # the local files read, in order (to point at a bad line)

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, datasets.IterableDataset)


def load_documents(
    source: str | Path | Sequence[str | Path] | datasets.Dataset | datasets.IterableDataset,
    *,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = False,
    hub_config: str | None = None,
    txt_sample_by: str = "document",
) -> Documents:
    """Open `split` of `source` (see the module docstring for what `source` may be)."""
    if txt_sample_by not in TXT_SAMPLE_BY:
        raise ValueError(f"txt_sample_by must be one of {TXT_SAMPLE_BY}, got {txt_sample_by!r}")
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return _checked(Documents(source, text_column, f"<in-memory {type(source).__name__}>"))
    if isinstance(source, (str, Path)) and not Path(source).exists():
        if not streaming or not isinstance(source, str):
            raise FileNotFoundError(
                f"data source {str(source)!r} does not exist; give a local file or directory "
                "of .parquet/.jsonl/.json/.txt files, or pass streaming=True to stream a hub dataset"
            )
        dataset = datasets.load_dataset(source, name=hub_config, split=split, streaming=True)
        return _checked(Documents(dataset, text_column, f"{source}[{split}]"))

    builder, files = _local_files(source, split)
    kwargs = {"sample_by": txt_sample_by} if builder == "text" else {}
    try:
        with _quiet_datasets_errors():  # it logs what it cannot read; the DataError says it better
            dataset = datasets.load_dataset(
                builder, data_files={split: files}, split=split, streaming=streaming, **kwargs
            )
    except Exception as err:  # noqa: BLE001 - datasets' readers raise many kinds; a named bad line explains any
        message = _unreadable_files_message(files, err)
        if message is None:
            raise
        raise DataError(message) from None
    name = str(source) if isinstance(source, (str, Path)) else f"{len(files)} files"
    return _checked(Documents(dataset, text_column, f"{name}[{split}]", tuple(files)))


def iter_texts(documents: Documents, limit: int | None = None) -> Iterator[str]:
    """The non-empty texts of `documents` in order (at most `limit` of them)."""
    count = 0
    for example in documents.dataset:
        if limit is not None and count >= limit:
            return
        text = example_text(example, documents)
        if text:
            count += 1
            yield text


def example_text(example: dict, documents: Documents) -> str:
    """The text of one example (a row as a dict)."""
    if documents.text_column not in example:
        raise MissingColumnError(_missing_column_message(documents, list(example)))
    return column_text(example[documents.text_column], documents)


def column_text(value: object, documents: Documents) -> str:
    """A text column value as str: None counts as empty, anything else but str is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ColumnTypeError(
            f"column {documents.text_column!r} of {documents.name} holds {type(value).__name__}, "
            "expected str; set text_column to a string column"
        )
    return value


def count_texts(documents: Documents) -> int:
    """How many documents of a map-style split have a non-empty text (from the Arrow offsets, no decoding)."""
    column = documents.dataset.with_format("arrow")[documents.text_column]
    return pc.sum(pc.greater(pc.fill_null(pc.binary_length(column), 0), 0)).as_py() or 0


def undecodable_row_error(documents: Documents, row: int | str, err: UnicodeDecodeError) -> DataError:
    """The error for a row whose text is not UTF-8 (found when it is read, mid-run)."""
    where = _first_bad_line(documents.files)
    if where:
        return DataError(f"{where} (row {row} of {documents.name})")
    return DataError(
        f"{documents.name} row {row}: text is not valid UTF-8 (byte {err.object[err.start]:#04x}); {_FIX_ENCODING}"
    )


def _unreadable_files_message(files: list[str], err: Exception) -> str | None:
    """Name the first bad line of `files` (found by reading them again), else give the reason of a
    failed dataset generation; None for another error (not the data's)."""
    where = _first_bad_line(files)
    if where:
        return where
    if not isinstance(err, DatasetGenerationError):
        return None
    cause = err.__cause__ or err.__context__ or err
    reason = (str(cause).strip().splitlines() or [""])[0]
    return f"cannot read the data files ({len(files)}, first {files[0]!r}): {type(cause).__name__}: {reason}"


@contextlib.contextmanager
def _quiet_datasets_errors():
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _first_bad_line(files) -> str | None:
    """'FILE line N: what is wrong' for the first line of a .jsonl/.json/.txt file that is not UTF-8 (or,
    in jsonl, not one JSON object), else None."""
    for name in files:
        path = Path(name)
        if not path.name.endswith((".jsonl", ".json", ".txt")) or not path.is_file():
            continue
        jsonl = path.name.endswith(".jsonl")
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                problem = _line_problem(raw, jsonl)
                if problem:
                    return f"{path} line {number}: {problem}"
    return None


def _line_problem(raw: bytes, jsonl: bool) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); {_FIX_ENCODING}"
    if not jsonl or not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); fix or remove the line"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, expected one object per line"


def _checked(documents: Documents) -> Documents:
    columns = documents.dataset.column_names  # None for some streaming sources
    if columns is not None and documents.text_column not in columns:
        raise MissingColumnError(_missing_column_message(documents, columns))
    if not documents.streaming:
        documents = Documents(
            documents.dataset.select_columns([documents.text_column]),
            documents.text_column,
            documents.name,
            documents.files,
        )
    return documents


def _missing_column_message(documents: Documents, columns: list[str]) -> str:
    return (
        f"text column {documents.text_column!r} not found in {documents.name}; "
        f"available columns: {columns}; set data.text_column"
    )


def _local_files(source: str | Path | Sequence[str | Path], split: str) -> tuple[str, list[str]]:
    """(builder, files of `split`) for a local file, list of files, or directory."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return _directory_files(Path(source), split)
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    if not paths:
        raise ValueError("empty list of data files")
    builders = set()
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        builders.add(_builder_of(path))
    if len(builders) > 1:
        raise ValueError(f"data files mix formats {sorted(builders)}; give files of one format")
    return builders.pop(), [str(p) for p in paths]


def _builder_of(path: Path) -> str:
    for builder, extensions in FORMATS.items():
        if path.name.endswith(extensions):
            return builder
    raise ValueError(f"unsupported data file {str(path)!r}; supported extensions: {', '.join(_ALL_EXTENSIONS)}")


def _directory_files(directory: Path, split: str) -> tuple[str, list[str]]:
    files = [
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    builder = next((b for b, exts in FORMATS.items() if any(p.name.endswith(exts) for p in files)), None)
    if builder is None:
        raise FileNotFoundError(f"no data files ({', '.join(_ALL_EXTENSIONS)}) under {str(directory)!r}")
    by_split = DataFilesDict.from_patterns(get_data_patterns(str(directory)), base_path=str(directory))
    splits = {
        str(name): sorted(f for f in split_files if f.endswith(FORMATS[builder]))
        for name, split_files in by_split.items()
    }
    splits = {name: split_files for name, split_files in splits.items() if split_files}
    if split not in splits:
        raise ValueError(
            f"split {split!r} not found in {str(directory)!r} ({builder} files); available splits: {sorted(splits)}"
        )
    return builder, splits[split]
