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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.data_files import DataFilesDict, get_data_patterns

# builder name -> file extensions, in order of precedence inside a directory
FORMATS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet",),
    "json": (".jsonl", ".json"),
    "text": (".txt",),
}
TXT_SAMPLE_BY = ("document", "paragraph", "line")
_ALL_EXTENSIONS = tuple(ext for exts in FORMATS.values() for ext in exts)


@dataclass(frozen=True)
class Documents:
    """A split of documents: the dataset, its text column, and a name for messages."""

    dataset: datasets.Dataset | datasets.IterableDataset
    text_column: str
    name: str

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
    dataset = datasets.load_dataset(
        builder, data_files={split: files}, split=split, streaming=streaming, **kwargs
    )
    name = str(source) if isinstance(source, (str, Path)) else f"{len(files)} files"
    return _checked(Documents(dataset, text_column, f"{name}[{split}]"))


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
        raise KeyError(_missing_column_message(documents, list(example)))
    return column_text(example[documents.text_column], documents)


def column_text(value: object, documents: Documents) -> str:
    """A text column value as str: None counts as empty, anything else but str is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(
            f"column {documents.text_column!r} of {documents.name} holds {type(value).__name__}, "
            "expected str; set text_column to a string column"
        )
    return value


def _checked(documents: Documents) -> Documents:
    columns = documents.dataset.column_names  # None for some streaming sources
    if columns is not None and documents.text_column not in columns:
        raise KeyError(_missing_column_message(documents, columns))
    if not documents.streaming:
        documents = Documents(
            documents.dataset.select_columns([documents.text_column]),
            documents.text_column,
            documents.name,
        )
    return documents


def _missing_column_message(documents: Documents, columns: list[str]) -> str:
    return (
        f"text column {documents.text_column!r} not found in {documents.name}; "
        f"available columns: {columns}; set text_column"
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
    raise ValueError(
        f"unsupported data file {str(path)!r}; supported extensions: {', '.join(_ALL_EXTENSIONS)}"
    )


def _directory_files(directory: Path, split: str) -> tuple[str, list[str]]:
    files = [
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    builder = next(
        (b for b, exts in FORMATS.items() if any(p.name.endswith(exts) for p in files)), None
    )
    if builder is None:
        raise FileNotFoundError(
            f"no data files ({', '.join(_ALL_EXTENSIONS)}) under {str(directory)!r}"
        )
    by_split = DataFilesDict.from_patterns(get_data_patterns(str(directory)), base_path=str(directory))
    splits = {
        str(name): sorted(f for f in split_files if f.endswith(FORMATS[builder]))
        for name, split_files in by_split.items()
    }
    splits = {name: split_files for name, split_files in splits.items() if split_files}
    if split not in splits:
        raise ValueError(
            f"split {split!r} not found in {str(directory)!r} ({builder} files); "
            f"available splits: {sorted(splits)}"
        )
    return builder, splits[split]
