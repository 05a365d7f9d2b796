"""Data: token shards and their samplers, staging of prepared data, BPE tokenizers, the built-in corpus.

`shards` reads Arrow token shards into windows, `staging` loads a prepared
folder (its `leviathan.run.manifest.Manifest`) and stages remote files,
`tokenizer` trains and loads the byte-level BPE, `corpus` writes the built-in
default text.
"""
