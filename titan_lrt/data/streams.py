"""Virtual streams: a partition of a split's documents that does not depend on the world size.

The documents of a split are divided into `num_streams` fixed streams. Each
stream reads its own documents, tokenizes them (BOS first) and is packed into
rows on its own, so the rows of a stream are the same whichever rank owns it;
only the assignment of streams to ranks changes with the world size.

- Map-style (local) data: document d belongs to stream `d mod N`. Each epoch
  visits a stream's documents in a permutation drawn from (seed, stream, epoch)
  with `torch.randperm`, so epochs are reshuffled deterministically (the order
  depends on the seed and the torch version, nothing else).
- Streaming data: stream s is `datasets.distributed.split_dataset_by_node(ds,
  rank=s, world_size=N)`, the datasets' own sharding (whole source shards when
  their count divides N, else every N-th example). Every epoch reads the same
  order; the position inside an epoch is restored with the datasets' own
  `state_dict`, so resuming never re-reads the stream.

Empty documents are skipped. A stream's position is a `StreamState`: the epoch,
the document, the token offset where its next row starts, and counters; it is
all a resume needs (the tokens of the current document are recomputed).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import NamedTuple, Protocol

import torch
from datasets.distributed import split_dataset_by_node

from titan_lrt.data.sources import DataError, Documents, column_text, count_texts, example_text, undecodable_row_error

# Documents are tokenized in chunks of up to this many documents or characters:
# enough for the tokenizer's batch parallelism, little buffered per stream.
DOCS_PER_CHUNK = 16
CHARS_PER_CHUNK = 1 << 16


class TextEncoder(Protocol):
    bos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


@dataclass
class StreamState:
    """Position and counters of one virtual stream (plain ints, or the datasets state)."""

    epoch: int = 0
    doc: int = 0  # index of the current document in the epoch's order
    offset: int = 0  # token offset (BOS = 0) in that document where the next row starts
    rows: int = 0  # rows this stream has produced
    tokens_read: int = 0  # tokens of the documents the stream has moved past
    tokens_dropped: int = 0  # of those, tokens packing placed in no row
    source: dict | None = None  # streaming only: datasets iterator state before `doc`

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict) -> StreamState:
        names = {f.name for f in fields(cls)}
        if set(state) != names:
            raise ValueError(f"stream state must have keys {sorted(names)}, got {sorted(state)}")
        return cls(**state)


class Document(NamedTuple):
    epoch: int
    doc: int
    text: str
    source: dict | None  # where a streaming reader resumes to read this document


def stream_document_order(num_documents: int, num_streams: int, stream: int, epoch: int, seed: int) -> torch.Tensor:
    """Dataset indices of `stream`'s documents in the order of `epoch` (map-style data)."""
    indices = torch.arange(stream, num_documents, num_streams)
    digest = hashlib.sha256(f"{seed}/{stream}/{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return indices[torch.randperm(len(indices), generator=generator)]


def read_stream(
    documents: Documents, num_streams: int, stream: int, seed: int, epoch: int, doc: int, source: dict | None
) -> Iterator[Document]:
    """The non-empty documents of `stream` from position (epoch, doc) on, forever."""
    reader = _read_streaming if documents.streaming else _read_map_style
    while True:
        found = False
        for document in reader(documents, num_streams, stream, seed, epoch, doc, source):
            found = True
            yield document
        if not found and doc == 0:  # a whole epoch without a document
            raise DataError(
                f"stream {stream} of {num_streams} has no non-empty document in {documents.name} "
                f"(column {documents.text_column!r}); lower num_streams, or check the text column and the data"
            )
        epoch, doc, source = epoch + 1, 0, None


def _read_map_style(documents, num_streams, stream, seed, epoch, doc, source) -> Iterator[Document]:
    order = stream_document_order(len(documents.dataset), num_streams, stream, epoch, seed)
    for start in range(doc, len(order), DOCS_PER_CHUNK):
        indices = order[start : start + DOCS_PER_CHUNK].tolist()
        values = _texts_of_rows(documents, indices)
        for j, value in enumerate(values, start):
            text = column_text(value, documents)
            if text:
                yield Document(epoch, j, text, None)


def _read_streaming(documents, num_streams, stream, seed, epoch, doc, source) -> Iterator[Document]:
    shard = split_dataset_by_node(documents.dataset, rank=stream, world_size=num_streams)
    if source is not None:
        shard.load_state_dict(source)
    before = source
    examples = iter(shard)
    for j in itertools.count(doc):
        try:
            example = next(examples, None)
        except UnicodeDecodeError as err:
            raise undecodable_row_error(documents, f"{j} of stream {stream}", err) from None
        if example is None:
            return
        text = example_text(example, documents)
        if text:
            yield Document(epoch, j, text, before)
        before = shard.state_dict()


def _texts_of_rows(documents: Documents, indices: list[int]) -> list:
    """The text column of these rows; a row whose bytes are not UTF-8 is named in a DataError."""
    try:
        return documents.dataset[indices][documents.text_column]
    except UnicodeDecodeError:
        for i in indices:  # find the row
            try:
                documents.dataset[i]
            except UnicodeDecodeError as err:
                raise undecodable_row_error(documents, i, err) from None
        raise


class TokenStream:
    """One virtual stream as tokenized documents, positioned by its `StreamState`.

    Packers read `current` (the tokens, BOS first, of the document the state
    points at) and move the state with `state.offset` and `next_document()`.
    """

    def __init__(
        self, documents: Documents, tokenizer: TextEncoder, num_streams: int, stream: int, seed: int, state: StreamState
    ):
        self.state = state
        self._tokenizer = tokenizer
        self._docs = read_stream(documents, num_streams, stream, seed, state.epoch, state.doc, state.source)
        self._buffer: deque[tuple[Document, torch.Tensor]] = deque()
        epoch, doc, offset = state.epoch, state.doc, state.offset
        self._load_next()
        if offset and ((self.state.epoch, self.state.doc) != (epoch, doc) or offset >= len(self.current)):
            raise ValueError(
                f"stream {stream}: saved position (epoch {epoch}, doc {doc}, offset {offset}) "
                f"is not inside a non-empty document of {documents.name}"
            )
        self.state.offset = offset

    def next_document(self) -> None:
        """Move past the current document to the start of the next non-empty one."""
        self.state.tokens_read += len(self.current)
        self._load_next()

    def _load_next(self) -> None:
        if not self._buffer:
            self._fill()
        document, tokens = self._buffer.popleft()
        self.state.epoch, self.state.doc, self.state.source = document.epoch, document.doc, document.source
        self.state.offset = 0
        self.current = tokens

    def _fill(self) -> None:
        chunk, chars = [], 0
        while len(chunk) < DOCS_PER_CHUNK and chars < CHARS_PER_CHUNK:
            chunk.append(next(self._docs))
            chars += len(chunk[-1].text)
        bos = self._tokenizer.bos_id
        for document, ids in zip(chunk, self._tokenizer.encode_batch([d.text for d in chunk])):
            self._buffer.append((document, torch.tensor([bos, *ids], dtype=torch.int32)))


class RawSource:
    """Raw documents tokenized on the fly: what the loader opens streams of (see `prepared.PreparedSplit`
    for pre-tokenized data, `mixture.Mixture` for several sources)."""

    def __init__(self, documents: Documents, tokenizer: TextEncoder):
        self.documents, self.tokenizer, self.name = documents, tokenizer, documents.name
        self.streaming = documents.streaming

    def check_streams(self, num_streams: int) -> None:
        if not self.documents.streaming:
            check_enough_documents(self.documents, num_streams)

    def open_stream(self, num_streams: int, stream: int, seed: int, state: StreamState) -> TokenStream:
        return TokenStream(self.documents, self.tokenizer, num_streams, stream, seed, state)


def check_enough_documents(documents: Documents, num_streams: int) -> None:
    """Every stream needs a document with text (map-style data, checked before training starts)."""
    total = len(documents.dataset)
    if total < num_streams:
        raise DataError(
            f"{documents.name} has {total} documents, fewer than num_streams={num_streams}; lower num_streams"
        )
    texts = count_texts(documents)
    if texts == 0:
        raise DataError(
            f"{documents.name}: all {total} documents are empty in column {documents.text_column!r}; "
            "check the text column (data.text_column) and the data"
        )
    if texts < num_streams:
        raise DataError(
            f"{documents.name} has {texts} non-empty documents (of {total}), fewer than num_streams={num_streams}; "
            "lower num_streams"
        )
