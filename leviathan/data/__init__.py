"""Data: token shards and their samplers, BPE tokenizers, and the built-in corpus.

`shards` reads prepared Parquet shards into windows, `tokenizer` trains and
loads the byte-level BPE, `corpus` writes the built-in default text.
"""
