"""Data pipeline: embedded corpus, tokenizer, document sources, packing, resumable loader.

Imports nothing from the model, parallel, train, checkpoint or config modules:
the trainer composes these pieces and passes plain arguments.
"""

from titan_lrt.data.corpus import ensure_stdlib_corpus
from titan_lrt.data.loader import TokenBatchLoader, build_dataloader, merge_loader_states
from titan_lrt.data.packing import PACKING_MODES
from titan_lrt.data.sources import load_documents
from titan_lrt.data.tokenizer import BOS_ID, BOS_TOKEN, Tokenizer, ensure_tokenizer, train_tokenizer

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "PACKING_MODES",
    "TokenBatchLoader",
    "Tokenizer",
    "build_dataloader",
    "ensure_stdlib_corpus",
    "ensure_tokenizer",
    "load_documents",
    "merge_loader_states",
    "train_tokenizer",
]
