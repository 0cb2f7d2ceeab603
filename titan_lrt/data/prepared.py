"""Pre-tokenized data: the folder `tools/prepare_data.py` writes, and its reader.

GPU nodes then do no tokenization: the loader slices memory-mapped token files.

Layout of a prepared folder DIR:

    DIR/tokenizer.json            the tokenizer the shards were made with
    DIR/prepare.json              the options of the prepare run (written first)
    DIR/meta.json                 written last: its presence means the folder is complete
    DIR/<split>/NNNNN.tokens.npy  tokens of the shard's documents, concatenated, each
                                  document starting with BOS; uint16 when the vocabulary
                                  fits (<= 65536 ids), else uint32
    DIR/<split>/NNNNN.offsets.npy int64, documents + 1 entries: document i is
                                  tokens[offsets[i]:offsets[i + 1]]
    DIR/<split>/NNNNN.json        the shard's counts (documents, tokens, bytes) and the
                                  source position after its last document; written after
                                  the two arrays, so a shard with its .json is finished

Splits are `train` and `validation`. `meta.json` holds the format, the token dtype,
the vocabulary (size, BOS id, a fingerprint), and per split the shard count and totals.

Reading: `PreparedSplit` numbers the documents of a split across its shards and
opens `PreparedStream`s, the pre-tokenized counterpart of `streams.TokenStream`:
the same virtual streams, document order and `StreamState`, so packing, exact
resume and resharding work as for raw sources (see `loader.py`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from titan_lrt.data.sources import load_documents
from titan_lrt.data.streams import RawSource, StreamState, TextEncoder, stream_document_order

FORMAT = "titan_lrt.prepared/1"
META_NAME = "meta.json"
OPTIONS_NAME = "prepare.json"
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "validation")
PREPARE_COMMAND = "python tools/prepare_data.py"
# the default corpus the README and the 1.3B configs prepare (FineWeb-Edu, 10B-token sample)
DEFAULT_HUB_SOURCE = "HuggingFaceFW/fineweb-edu"
DEFAULT_HUB_CONFIG = "sample-10BT"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def vocabulary_fingerprint(tokenizer) -> str:
    """sha256 of the id -> token table: shards and tokenizer must agree on it."""
    vocab = tokenizer.vocabulary()
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()


def shard_files(folder: str | Path, split: str, index: int) -> tuple[Path, Path, Path]:
    """(tokens, offsets, info) paths of shard `index` of `split`."""
    stem = Path(folder) / split / f"{index:05d}"
    return stem.with_suffix(".tokens.npy"), stem.with_suffix(".offsets.npy"), stem.with_suffix(".json")


def write_shard(
    folder: str | Path, split: str, index: int, documents: Sequence[np.ndarray], dtype: np.dtype, info: dict
) -> dict:
    """Write one shard atomically (temporary files renamed into place, the .json last); returns its info."""
    tokens_path, offsets_path, info_path = shard_files(folder, split, index)
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(documents).astype(dtype) if documents else np.zeros(0, dtype=dtype)
    info = {**info, "documents": len(documents), "tokens": int(offsets[-1])}
    for path, array in ((tokens_path, tokens), (offsets_path, offsets)):
        _atomic_write(path, lambda f, a=array: np.save(f, a, allow_pickle=False))
    _atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=1).encode()))
    return info


def finished_shards(folder: str | Path, split: str) -> list[dict]:
    """Infos of the finished shards 0, 1, ... of `split` (up to the first one missing)."""
    infos = []
    while True:
        info_path = shard_files(folder, split, len(infos))[2]
        if not info_path.is_file():
            return infos
        infos.append(json.loads(info_path.read_text()))


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / META_NAME).is_file()


def is_unfinished(path: str | Path) -> bool:
    return (Path(path) / OPTIONS_NAME).is_file() and not is_prepared(path)


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if not is_prepared(folder):
        raise FileNotFoundError(
            unfinished_message(folder)
            if is_unfinished(folder)
            else f"{folder} is not a prepared data folder (no {META_NAME})"
        )
    meta = json.loads((folder / META_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META_NAME} has format {meta.get('format')!r}, this reader reads {FORMAT!r}")
    return meta


def unfinished_message(folder: Path) -> str:
    counts = ", ".join(f"{len(finished_shards(folder, s))} {s}" for s in SPLITS)
    return (
        f"{folder} is an unfinished prepare ({counts} shards done); rerun the same "
        f"{PREPARE_COMMAND} ... --out {folder} to finish it (finished shards are kept)"
    )


def prepare_command(folder: str | Path, vocab_size: int) -> str:
    """The command that prepares the default corpus into `folder` (for messages and the README)."""
    return (
        f"{PREPARE_COMMAND} {DEFAULT_HUB_SOURCE} --hub-config {DEFAULT_HUB_CONFIG} --streaming "
        f"--vocab-size {vocab_size} --out {folder}"
    )


def require_data_source(path: str | Path, vocab_size: int) -> None:
    """Stop with one line (and the command that prepares it) when a data path does not exist or is unfinished."""
    path = Path(path)
    if is_unfinished(path):
        raise FileNotFoundError(unfinished_message(path))
    if not path.exists():
        raise FileNotFoundError(
            f"data {str(path)!r} does not exist; prepare it with: {prepare_command(path, vocab_size)}"
        )


class PreparedSplit:
    """The documents of one split of a prepared folder, as token tensors (BOS first)."""

    streaming = False

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.split = split
        self.name = f"{self.folder}[{split}]"
        if split not in self.meta["splits"]:
            raise ValueError(
                f"split {split!r} not found in prepared {self.folder}; available: {sorted(self.meta['splits'])}"
            )
        self.num_shards = self.meta["splits"][split]["shards"]
        self.infos = [self._shard_info(i) for i in range(self.num_shards)]
        self.starts = np.cumsum([0] + [info["documents"] for info in self.infos]).tolist()
        self.num_documents = self.starts[-1]
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None  # memory maps, opened on first read

    def __getstate__(self) -> dict:  # a loader worker maps the files itself
        return {**self.__dict__, "_arrays": None}

    def document(self, index: int) -> torch.Tensor:
        """Tokens of document `index` of the split, int32."""
        if self._arrays is None:
            self._arrays = [self._map_shard(i) for i in range(self.num_shards)]
        shard = bisect.bisect_right(self.starts, index) - 1
        tokens, offsets = self._arrays[shard]
        local = index - self.starts[shard]
        return torch.from_numpy(tokens[offsets[local] : offsets[local + 1]].astype(np.int32))

    def check_tokenizer(self, tokenizer: TextEncoder) -> None:
        """The training tokenizer must be the one the shards were made with."""
        vocab = self.meta["vocabulary"]
        theirs = {"bos_id": tokenizer.bos_id, "vocab_size": getattr(tokenizer, "vocab_size", None)}
        if hasattr(tokenizer, "vocabulary"):
            theirs["sha256"] = vocabulary_fingerprint(tokenizer)
        for key, value in theirs.items():
            if value != vocab[key]:
                raise ValueError(
                    f"tokenizer {getattr(tokenizer, 'name', '')} does not match the shards of {self.folder} "
                    f"({key} {value!r} vs {vocab[key]!r}); use model.tokenizer_path = {self.folder / TOKENIZER_NAME}"
                )

    def check_streams(self, num_streams: int) -> None:
        if self.num_documents < num_streams:
            raise ValueError(
                f"{self.name} has {self.num_documents} documents, fewer than num_streams={num_streams}; "
                "lower num_streams"
            )

    def open_stream(self, num_streams: int, stream: int, seed: int, state: StreamState) -> PreparedStream:
        return PreparedStream(self, num_streams, stream, seed, state)

    def _shard_info(self, index: int) -> dict:
        tokens_path, offsets_path, info_path = shard_files(self.folder, self.split, index)
        for path in (tokens_path, offsets_path, info_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the prepared folder {self.folder} is incomplete; copy the whole folder "
                    f"or prepare it again with {PREPARE_COMMAND}"
                )
        return json.loads(info_path.read_text())

    def _map_shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        tokens_path, offsets_path, _ = shard_files(self.folder, self.split, index)
        tokens = np.load(tokens_path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
        info = self.infos[index]
        if (
            tokens.dtype != np.dtype(self.meta["dtype"])
            or len(tokens) != info["tokens"]
            or len(offsets) != info["documents"] + 1
        ):
            raise ValueError(
                f"shard {tokens_path} does not match its {tokens_path.name.split('.')[0]}.json "
                f"({len(tokens)} {tokens.dtype} tokens, {len(offsets) - 1} documents; expected {info['tokens']} "
                f"{self.meta['dtype']}, {info['documents']}): the file is damaged; prepare the folder again"
            )
        return tokens, offsets


class PreparedStream:
    """One virtual stream of a `PreparedSplit`: `streams.TokenStream`'s interface, without tokenizing.

    Stream s holds the documents d = s (mod N) in the order `stream_document_order` draws per epoch.
    """

    def __init__(self, split: PreparedSplit, num_streams: int, stream: int, seed: int, state: StreamState):
        self.state = state
        self._split, self._num_streams, self._stream, self._seed = split, num_streams, stream, seed
        self._order = self._epoch_order(state.epoch)
        if state.doc >= len(self._order) or state.offset >= len(self._document()):
            raise ValueError(
                f"stream {stream}: saved position (epoch {state.epoch}, doc {state.doc}, offset {state.offset}) "
                f"is not inside a document of {split.name}"
            )
        self.current = self._document()

    def next_document(self) -> None:
        """Move past the current document to the start of the next one."""
        self.state.tokens_read += len(self.current)
        self.state.doc += 1
        if self.state.doc == len(self._order):
            self.state.epoch, self.state.doc = self.state.epoch + 1, 0
            self._order = self._epoch_order(self.state.epoch)
        self.state.offset = 0
        self.current = self._document()

    def _epoch_order(self, epoch: int) -> list[int]:
        return stream_document_order(
            self._split.num_documents, self._num_streams, self._stream, epoch, self._seed
        ).tolist()

    def _document(self) -> torch.Tensor:
        return self._split.document(self._order[self.state.doc])


def open_source(source, *, split: str, tokenizer: TextEncoder, **raw_options):
    """A prepared folder as a `PreparedSplit` (checked against `tokenizer`), anything else as a `RawSource`
    of `sources.load_documents(source, split=split, **raw_options)`."""
    if isinstance(source, (str, Path)):
        if is_prepared(source):
            prepared = PreparedSplit(source, split)
            prepared.check_tokenizer(tokenizer)
            return prepared
        if is_unfinished(source):
            raise FileNotFoundError(unfinished_message(Path(source)))
    return RawSource(load_documents(source, split=split, **raw_options), tokenizer)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
