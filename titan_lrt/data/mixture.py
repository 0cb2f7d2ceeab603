"""Mixtures: documents drawn from several sources in given proportions.

    [data]
    mixture = { "data/web" = 0.7, "data/code" = 0.3 }

Each source (a prepared folder or a raw one, see `prepared.open_source`) keeps its
own `num_streams` virtual streams. Virtual stream s of the mixture reads stream s
of every source: its k-th document comes from the source that a uniform draw
u(seed, s, k) (from a hash, so no generator state) selects by the normalised
weights, and is that source's next document. The proportions therefore hold per
document, whatever the world size, and a resume needs only counters.

State of a mixture stream: a `StreamState` whose `doc` counts the documents drawn
(k) and whose offset, rows and dropped tokens are the packer's as usual; its
`source` field holds {"sources": {name: StreamState dict}}, the position of each
source's own stream s (at its next unread document). Plain JSON, like the rest.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping

from titan_lrt.data.streams import StreamState


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """The weights as {source: float}, each finite and > 0 (one clear error otherwise)."""
    if not weights:
        raise ValueError("mixture is empty; give at least one source = weight")
    checked = {}
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"mixture weight of {name!r} is {weight!r}; every weight must be a number > 0")
        checked[str(name)] = float(weight)
    return checked


class Mixture:
    """Several opened sources (`RawSource`, `PreparedSplit`) with weights; opens `MixtureStream`s."""

    def __init__(self, sources: Mapping[str, object], weights: Mapping[str, float]):
        self.weights = check_weights(weights)
        if set(sources) != set(self.weights):
            raise ValueError(f"mixture sources {sorted(sources)} and weights {sorted(self.weights)} differ")
        self.sources = dict(sources)
        self.streaming = any(source.streaming for source in self.sources.values())
        self.names = sorted(self.weights)
        total = sum(self.weights.values())
        self._cumulative = [sum(self.weights[n] for n in self.names[: i + 1]) / total for i in range(len(self.names))]
        self.name = "mixture of " + ", ".join(f"{n} ({self.weights[n] / total:.0%})" for n in self.names)

    def check_streams(self, num_streams: int) -> None:
        for source in self.sources.values():
            source.check_streams(num_streams)

    def pick(self, seed: int, stream: int, k: int) -> str:
        """The source of document k of virtual stream `stream`."""
        digest = hashlib.sha256(f"mixture/{seed}/{stream}/{k}".encode()).digest()
        u = int.from_bytes(digest[:8], "little") / 2.0**64
        return self.names[min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)]

    def open_stream(self, num_streams: int, stream: int, seed: int, state: StreamState) -> MixtureStream:
        return MixtureStream(self, num_streams, stream, seed, state)

    def tokens_read_by_source(self, stream_states: Iterable[dict]) -> dict[str, int]:
        """Tokens read from each source, summed over the given stream state dicts."""
        totals = dict.fromkeys(self.names, 0)
        for state in stream_states:
            for name, sub in (state["source"] or {}).get("sources", {}).items():
                totals[name] += sub["tokens_read"]
        return totals


class MixtureStream:
    """Virtual stream `stream` of a `Mixture`: `streams.TokenStream`'s interface over the sources' streams."""

    def __init__(self, mixture: Mixture, num_streams: int, stream: int, seed: int, state: StreamState):
        self.state = state
        self._mixture, self._num_streams, self._stream, self._seed = mixture, num_streams, stream, seed
        saved = (state.source or {}).get("sources", {})
        if not set(saved) <= set(mixture.names):
            raise ValueError(
                f"stream {stream}: saved mixture sources {sorted(saved)} are not those of this run {mixture.names}; "
                "resume with the same data.mixture"
            )
        self._sub_states = {n: StreamState.from_dict(saved[n]) if n in saved else StreamState() for n in mixture.names}
        self._streams: dict = {}  # opened on first draw
        self.state.source = {"sources": {n: s.to_dict() for n, s in self._sub_states.items()}}
        offset = state.offset
        self._load_current()
        if offset >= len(self.current):
            raise ValueError(f"stream {stream}: saved offset {offset} is not inside the current mixture document")
        self.state.offset = offset

    def next_document(self) -> None:
        """Move past the current document; the next one comes from the source drawn for it."""
        self.state.tokens_read += len(self.current)
        name = self._current_source
        self._streams[name].next_document()
        self._sync(name)
        self.state.doc += 1
        self.state.offset = 0
        self._load_current()

    def _load_current(self) -> None:
        name = self._mixture.pick(self._seed, self._stream, self.state.doc)
        if name not in self._streams:
            source = self._mixture.sources[name]
            self._streams[name] = source.open_stream(
                self._num_streams, self._stream, self._seed, self._sub_states[name]
            )
            self._sync(name)
        self._current_source = name
        self.current = self._streams[name].current

    def _sync(self, name: str) -> None:
        """Mirror a source stream's position into this stream's (JSON) state."""
        self.state.source["sources"][name] = self._streams[name].state.to_dict()
