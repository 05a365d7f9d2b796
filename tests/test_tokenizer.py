"""Byte and BPE tokenizers: exact round trips, special tokens, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leviathan.data.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    TokenizerError,
    _byte_level_alphabet,
    load_tokenizer,
)

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "The quick brown fox jumps over the lazy dog. Ünïcödé: Ελληνικά, русский, 中文, emoji 🙂.\n"
) * 40


_BPE_FOR_HYPOTHESIS = BPETokenizer.train([TEXT], vocab_size=300)  # hypothesis tests cannot take fixtures


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TEXT, "class Foo:\n    pass\n" * 20], vocab_size=320)


def test_byte_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260
    assert [tok.specials[s] for s in SPECIAL_TOKENS] == [256, 257, 258, 259]
    assert tok.eos_id == 256
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]
    assert tok.encode("<|eos|>") == list(b"<|eos|>"), "special tokens must not be parsed from text"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_byte_round_trips_any_bytes(data: bytes):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert len(ids) == len(data)
    assert tok.decode_bytes(ids) == data


def test_byte_decode_replaces_invalid_utf8_and_drops_specials():
    tok = ByteTokenizer()
    ids = tok.encode(b"ok\xff\xfe!") + [tok.eos_id]
    assert tok.decode_bytes(ids) == b"ok\xff\xfe!"
    assert tok.decode(ids) == "ok\ufffd\ufffd!"
    assert tok.decode(torch.tensor(tok.encode("hé"))) == "hé"
    assert tok.decode(np.array(tok.encode("hé"), dtype=np.uint16)) == "hé"


def test_byte_save_and_load(tmp_path):
    path = ByteTokenizer().save(tmp_path)
    assert json.loads(path.read_text())["kind"] == "byte"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer)


def test_byte_level_alphabet_matches_tokenizers():
    from tokenizers import pre_tokenizers

    table = _byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())


def test_bpe_specials_first_and_vocab(bpe):
    assert bpe.vocab_size == 320
    assert [bpe.specials[s] for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert bpe.eos_id == 0
    assert bpe.spec() == {"kind": "bpe", "vocab_size": 320, "file": "tokenizer.json", "specials": bpe.specials}


def _without_special_spellings(text: str) -> bool:
    return not any(special in text for special in SPECIAL_TOKENS)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200).filter(_without_special_spellings))
def test_bpe_round_trips_text(text: str):
    """Any text without a special token's spelling comes back byte for byte (`tokenizers`
    parses those spellings as the special tokens themselves, which decode drops)."""
    tok = _BPE_FOR_HYPOTHESIS
    ids = tok.encode(text)
    assert tok.decode(ids) == text.encode("utf-8", errors="replace").decode("utf-8")
    assert tok.decode_bytes(ids) == text.encode("utf-8", errors="replace")


def test_bpe_compresses_seen_text(bpe):
    ids = bpe.encode(TEXT)
    assert len(ids) < 0.75 * len(TEXT.encode()), f"{len(ids)} tokens for {len(TEXT.encode())} bytes"
    assert bpe.decode(ids) == TEXT
    assert bpe.encode_batch([TEXT[:100], TEXT[100:300]]) == [bpe.encode(TEXT[:100]), bpe.encode(TEXT[100:300])]


def test_bpe_bytes_input_replaces_invalid_utf8(bpe):
    assert bpe.decode(bpe.encode(b"a\xffb")) == "a\ufffdb"


def test_bpe_save_and_load(tmp_path, bpe):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(TEXT) == bpe.encode(TEXT)
    assert loaded.vocab_size == bpe.vocab_size


def test_bpe_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train([TEXT], vocab_size=100)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"kind": "bpe", "file": "missing.json"}}))
    with pytest.raises(TokenizerError, match=r"manifest.json: format_version: None"):
        load_tokenizer(tmp_path / "manifest.json")  # not a manifest `prepare` writes: the field is named

    from leviathan.run.manifest import Domain, Manifest, Split, write_manifest

    split = Split(file="d/train.arrow", tokens=10, bytes=10)
    domain = Domain(name="d", splits={"train": split, "val": split})
    write_manifest(Manifest(tokenizer={"kind": "bpe", "file": "missing.json"}, vocab_size=300, dtype="uint16",
                            domains=[domain]), str(tmp_path))
    with pytest.raises(TokenizerError, match="missing.json"):
        load_tokenizer(tmp_path / "manifest.json")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=120) | st.sampled_from(["  x", "\n\n  \tdef", "it's 3.14", "a<|eos|>b", "<|"]), max_size=6))
def test_bpe_encode_batch_matches_tokenizers(texts: list[str]):
    """The word-cache encoder gives `tokenizers`' ids for any text, special-token spellings included."""
    tok = _BPE_FOR_HYPOTHESIS
    assert tok.encode_batch(texts) == tok._encode_with_tokenizers(texts)


def test_bpe_encode_batch_matches_tokenizers_on_every_unicode_category(bpe):
    from leviathan.data.corpus import BUILTIN_DOMAINS

    unicode_domain = next(d for d in BUILTIN_DOMAINS if d.name == "unicode")
    text = b"".join(unicode_domain.documents()).decode("utf-8")
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + 500]) for i in range(0, len(lines), 500)]
    assert bpe.encode_batch(chunks) == bpe._encode_with_tokenizers(chunks)


def test_bpe_with_another_pre_tokenizer_encodes_through_tokenizers(tmp_path, bpe):
    data = json.loads(bpe._tok.to_str())
    data["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    other = BPETokenizer.from_file(tmp_path / "tokenizer.json")
    assert other._words is None
    assert other.encode_batch(["x = 1", "hello"]) == [other.encode("x = 1"), other.encode("hello")]
