"""Byte-level BPE tokenizer: training with Hugging Face `tokenizers`, and a thin wrapper.

Tokenizers trained here are byte-level (every UTF-8 string round-trips
exactly, no unknown token), split text with the GPT-2 byte-level regex, and
carry one special token, `<|bos|>`, whose id is always **0** (`BOS_ID`): the
trainer assigns special tokens before the 256 byte tokens and the merges, so
the id does not move with the vocabulary size.

`Tokenizer` loads any `tokenizer.json` by path. For a foreign file the BOS token
is `bos_token` if given, else the first of `COMMON_BOS_TOKENS` in its vocabulary.
`encode` never adds special tokens: the packer prepends BOS to each document.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from titan_lrt.data.sources import DataError, iter_texts, load_documents

BOS_TOKEN = "<|bos|>"
BOS_ID = 0
COMMON_BOS_TOKENS = ("<|bos|>", "<|endoftext|>", "<s>", "<bos>", "<|begin_of_text|>")
_MIN_VOCAB_SIZE = 256 + 1 + 1  # bytes + <|bos|> + at least one merge
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """Encode/decode text and describe the vocabulary (BOS id, bytes per token)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str | None = None, name: str = "tokenizer"):
        self._tok = tokenizer
        self.name = name
        self.bos_token = _find_bos_token(tokenizer, bos_token, name)
        self.bos_id: int = tokenizer.token_to_id(self.bos_token)
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self._token_bytes: torch.Tensor | None = None

    @classmethod
    def from_file(cls, path: str | Path, *, bos_token: str | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception for a bad file
            raise DataError(
                f"tokenizer file {str(path)!r} is not a readable tokenizer.json ({str(e).splitlines()[0]}); "
                "give another file or train one with tools/train_tokenizer.py"
            ) from None
        return cls(tok, bos_token=bos_token, name=str(path))

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._tok.save(str(tmp))
        os.replace(tmp, path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def vocabulary(self) -> dict[str, int]:
        """Token -> id, special tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each token decodes to, shape (vocab_size,), long; 0 for special tokens.

        Summed over the tokens of a text this gives the text's byte count, the
        denominator of bits-per-byte. Exact for byte-level tokenizers (each
        character of a byte-level token stands for one byte); for others it is
        the byte length of the token decoded alone (byte-fallback tokens
        `<0xNN>` count 1), which can miss a space that a decoder adds only
        between tokens.
        """
        if self._token_bytes is None:
            self._token_bytes = self._count_token_bytes()
        return self._token_bytes

    def _count_token_bytes(self) -> torch.Tensor:
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        byte_level = _is_byte_level(self._tok)
        counts = torch.zeros(self.vocab_size, dtype=torch.long)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is None or i in specials:
                continue
            if byte_level:
                counts[i] = len(token)
            elif _BYTE_FALLBACK_TOKEN.fullmatch(token):
                counts[i] = 1
            else:
                counts[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return counts


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE with `<|bos|>` at id 0 on `texts`.

    The result can be smaller than `vocab_size` when the texts allow fewer merges.
    """
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer >= {_MIN_VOCAB_SIZE} "
            f"(256 bytes + {BOS_TOKEN} + at least one merge), got {vocab_size!r}"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    if tok.token_to_id(BOS_TOKEN) != BOS_ID:
        raise RuntimeError(f"{BOS_TOKEN} got id {tok.token_to_id(BOS_TOKEN)}, expected {BOS_ID}")
    return Tokenizer(tok, bos_token=BOS_TOKEN, name="trained BPE")


def word_level_tokenizer(words: list[str]) -> Tokenizer:
    """One token per given text (e.g. " cat", ":"), in order after `<|bos|>` (0) and `<|unk|>` (1);
    text is split at those words alone and decodes by concatenation. For synthetic tasks."""
    unk = "<|unk|>"
    vocab = {BOS_TOKEN: BOS_ID, unk: 1} | {w: 2 + i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=unk))
    longest_first = sorted(words, key=len, reverse=True)  # " cats" before " cat"
    tok.pre_tokenizer = pre_tokenizers.Split(
        tokenizers.Regex("|".join(re.escape(w) for w in longest_first)), behavior="isolated"
    )
    tok.decoder = decoders.Fuse()  # the tokens are the text: no spaces between them
    tok.add_special_tokens([BOS_TOKEN, unk])
    return Tokenizer(tok, bos_token=BOS_TOKEN, name="word-level tokenizer")


def ensure_tokenizer(path: str | Path, corpus_dir: str | Path, vocab_size: int, *, show_progress: bool = True) -> Path:
    """Train on the train split of `corpus_dir` and save to `path`, unless `path` exists.

    An existing file is used as it is, whatever its vocabulary size.
    """
    path = Path(path)
    if not path.exists():
        texts = iter_texts(load_documents(corpus_dir, split="train"))
        train_tokenizer(texts, vocab_size, show_progress=show_progress).save(path)
    return path


def _find_bos_token(tok: tokenizers.Tokenizer, bos_token: str | None, name: str) -> str:
    if bos_token is not None:
        if tok.token_to_id(bos_token) is None:
            raise ValueError(f"bos_token {bos_token!r} is not in the vocabulary of {name}")
        return bos_token
    for candidate in COMMON_BOS_TOKENS:
        if tok.token_to_id(candidate) is not None:
            return candidate
    raise ValueError(
        f"no BOS token in {name}: none of {list(COMMON_BOS_TOKENS)} is in its vocabulary; "
        "pass bos_token=<the token that starts a document>"
    )


def _is_byte_level(tok: tokenizers.Tokenizer) -> bool:
    """True when the decoder maps each token character to one byte (GPT-2 style)."""
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)
