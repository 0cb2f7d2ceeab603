"""Data pipeline: embedded corpus, tokenizer, document sources, packing, resumable loader.

Modules (import them directly; this package imports nothing so that light
tools such as the corpus builder start fast):

    corpus     ensure_stdlib_corpus: the offline default corpus
    tokenizer  train_tokenizer, ensure_tokenizer, Tokenizer (BOS id 0)
    sources    load_documents: local parquet/jsonl/json/txt or a hub stream
    prepared   pre-tokenized shards (tools/prepare_data.py writes them) and their reader
    mixture    documents drawn from several sources by weight
    streams    world-size-independent virtual streams of documents; RawSource
    packing    concat / bos_aligned rows of seq_len + 1 tokens
    loader     build_dataloader, TokenBatchLoader, merge_loader_states

Nothing here imports the model, parallel, train, checkpoint or config
modules: the trainer composes these pieces and passes plain arguments.
"""
