"""Packing: cutting one stream of tokenized documents into rows of `seq_len + 1` tokens.

A row gives a training sample as inputs `row[:-1]` and targets `row[1:]`.
Every document starts with BOS. Two strategies:

- `concat`: the documents of a stream are concatenated and cut into rows.
  Consecutive rows overlap by one token (a row starts at the previous row's last
  token), so every token after the first is a target exactly once and nothing
  is dropped. Rows may start mid-document.

- `bos_aligned`: each row starts at a document start (its BOS), except the
  continuation rows of a document longer than a row, which start mid-document
  and overlap the previous row by one token. Documents are appended while they
  fit. A document that does not fit in the rest of the row:
    * longer than a row: starts in this row and flows on into the next rows
      (nothing dropped);
    * otherwise: cropped to the rest of the row, its remainder dropped, and
      the next row starts at the next document.
  The dropped tokens are counted (`StreamState.tokens_dropped`; the loader
  reports them as a fraction of the tokens read). The gain: a model that
  resets its state at BOS sees every document from its start.

Packing state is only the stream position (`StreamState`): where the next row
starts. No token buffer survives a row, so resume is exact and cheap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from titan_lrt.data.streams import TokenStream


def pack_concat_row(stream: TokenStream, row_len: int) -> torch.Tensor:
    """The next `row_len` tokens of the concatenated stream, overlapping the last row by one."""
    state = stream.state
    pieces, space = [], row_len
    while True:
        take = min(space, len(stream.current) - state.offset)
        pieces.append(stream.current[state.offset : state.offset + take])
        space -= take
        if space == 0:
            state.offset += take - 1  # the next row starts at this row's last token
            break
        stream.next_document()
    state.rows += 1
    return torch.cat(pieces)


def pack_bos_aligned_row(stream: TokenStream, row_len: int) -> torch.Tensor:
    """The next row that starts at a document start (or continues a document longer than a row)."""
    state = stream.state
    take = min(row_len, len(stream.current) - state.offset)
    pieces, space = [stream.current[state.offset : state.offset + take]], row_len - take
    if space == 0 and state.offset + take < len(stream.current):
        state.offset += take - 1  # continuation row of a long document
    else:
        stream.next_document()
    while space > 0:
        doc = stream.current
        if len(doc) <= space:
            pieces.append(doc)
            space -= len(doc)
            stream.next_document()
        elif len(doc) > row_len:  # long document: flows into continuation rows
            pieces.append(doc[:space])
            state.offset = space - 1
            space = 0
        else:  # fits a row, not the rest of this one: crop
            pieces.append(doc[:space])
            state.tokens_dropped += len(doc) - space
            space = 0
            stream.next_document()
    state.rows += 1
    return torch.cat(pieces)


_PACKERS: dict[str, Callable[[TokenStream, int], torch.Tensor]] = {
    "concat": pack_concat_row,
    "bos_aligned": pack_bos_aligned_row,
}
PACKING_MODES = tuple(_PACKERS)
"""data.packing: how documents become rows (see the functions above)."""


def row_packer(packing: str) -> Callable[[TokenStream, int], torch.Tensor]:
    """The packing function named `packing` (one of `PACKING_MODES`)."""
    if packing in _PACKERS:
        return _PACKERS[packing]
    raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")
