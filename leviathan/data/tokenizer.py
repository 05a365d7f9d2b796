"""Tokenizers: byte-level (the default, nothing to train or download) and BPE.

Both share one small interface, so the data layer, the trainer and the
evaluation never ask which one they hold:

    vocab_size, eos_id, encode(text) -> list[int], decode(ids) -> str,
    decode_bytes(ids) -> bytes, spec() -> dict, save(folder)

`ByteTokenizer`: ids 0..255 are the bytes themselves, then four special tokens
(256 `<|eos|>`, 257 `<|pad|>`, 258 `<|bos|>`, 259 `<|sep|>`), vocab 260. It
round-trips every byte string exactly, invalid UTF-8 included, and one token is
one byte, so bits per byte = loss / ln 2.

`BPETokenizer`: a byte-level BPE (GPT-2 style) trained on the prepared corpus
with Hugging Face `tokenizers`; the same special tokens come first (ids 0..3).
Its input is text, so a `bytes` argument is decoded as UTF-8 with invalid bytes
replaced; `decode_bytes` maps every token back to its exact bytes.

Special tokens are never parsed out of input text by the byte tokenizer (the
text "<|eos|>" is seven bytes); documents are separated by `eos_id`, inserted by
the data pipeline, not by `encode`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

if TYPE_CHECKING:
    import numpy as np


SPECIAL_TOKENS = ("<|eos|>", "<|pad|>", "<|bos|>", "<|sep|>")
TOKENIZER_FILE = "tokenizer.json"

# GPT-2's word split, the one `tokenizers`' ByteLevel pre-tokenizer applies with use_regex=True
# ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), with the letter and
# number branches tried first: no two of those branches match at the same position except the
# contractions and the punctuation branch, which keep their order. 10% faster, the same words.
BYTE_LEVEL_SPLIT = r""" ?\p{L}+| ?\p{N}+|'(?:s|t|re|ve|m|ll|d)| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORD_CACHE_LIMIT = 1 << 20  # distinct words remembered by BPETokenizer.encode_batch before it starts over


class TokenizerError(ValueError):
    """A tokenizer file that is missing or cannot be read; the message names the file."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str | bytes) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...

    def spec(self) -> dict[str, Any]: ...

    def save(self, folder: str | Path) -> Path: ...


def _as_int_list(ids: Iterable[int]) -> list[int]:
    """Accept lists, numpy arrays and torch tensors (anything with `tolist`)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids]


class ByteTokenizer:
    """One token per byte, plus `SPECIAL_TOKENS` at 256..259."""

    kind = "byte"
    vocab_size = 256 + len(SPECIAL_TOKENS)
    specials = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
    eos_id = specials["<|eos|>"]
    pad_id = specials["<|pad|>"]
    bos_id = specials["<|bos|>"]
    sep_id = specials["<|sep|>"]

    def encode(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return list(data)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes of the byte tokens; special tokens are dropped."""
        return bytes(i for i in _as_int_list(ids) if 0 <= i < 256)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "file": None, "specials": dict(self.specials)}

    def save(self, folder: str | Path) -> Path:
        """Write `tokenizer.json` describing this tokenizer, so a saved model folder is self-contained."""
        path = Path(folder) / TOKENIZER_FILE
        path.write_text(json.dumps(self.spec(), indent=2) + "\n")
        return path

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260)"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes (what `ByteLevel` works on) -> byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class BPETokenizer:
    """Byte-level BPE from Hugging Face `tokenizers`; specials take ids 0..3."""

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size())
        self.specials = {name: tokenizer.token_to_id(name) for name in SPECIAL_TOKENS}
        if any(i is None for i in self.specials.values()):
            raise TokenizerError(f"BPE tokenizer lacks the special tokens {SPECIAL_TOKENS}")
        self.eos_id = self.specials["<|eos|>"]
        self.pad_id = self.specials["<|pad|>"]
        self.bos_id = self.specials["<|bos|>"]
        self.sep_id = self.specials["<|sep|>"]
        alphabet = _byte_level_alphabet()
        special_ids = set(self.specials.values())
        # id -> exact bytes, for decode_bytes (specials decode to nothing).
        self._id_bytes = [
            b"" if i in special_ids else bytes(alphabet[c] for c in tokenizer.id_to_token(i))
            for i in range(self.vocab_size)
        ]
        self._words = _word_splitter(tokenizer)
        self._word_ids: dict[str, bytes] = {}
        # byte b (as the latin-1 character chr(b)) -> ByteLevel's printable stand-in, for str.translate
        self._byte_level = {b: ord(c) for c, b in alphabet.items()}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (e.g. into Ray actors) without the word cache, which each process builds itself."""
        return {**self.__dict__, "_word_ids": {}}

    @classmethod
    def train(cls, texts: Iterator[str] | Iterable[str], vocab_size: int = 4096, length: int | None = None) -> "BPETokenizer":
        """Train on an iterable of texts (e.g. the train split of every domain).

        vocab_size counts the 256 byte symbols and the 4 specials; the result may
        be smaller when the corpus has fewer distinct merges.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size: {vocab_size} is below 260 (256 bytes + {len(SPECIAL_TOKENS)} specials)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception for a corrupt file
            raise TokenizerError(f"{path}: not a tokenizers BPE file ({e})") from None

    @staticmethod
    def _text(text: str | bytes) -> str:
        return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")

    def encode(self, text: str | bytes) -> list[int]:
        return self._tok.encode(self._text(text), add_special_tokens=False).ids

    def _encode_with_tokenizers(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def encode_batch(self, texts: list[str | bytes]) -> list[list[int]]:
        """Encode many texts at once (`encode_arrays`, as lists)."""
        return [ids.tolist() for ids in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str | bytes]) -> list[np.ndarray]:
        """Encode many texts into (n_i,) uint32 id arrays: the same ids as `tokenizers`,
        for about a third of its CPU time.

        BPE encodes each word of the GPT-2 split on its own, and a corpus repeats
        its words (Zipf), so the ids of every distinct word are remembered (as
        uint32 bytes): the texts are split with the same regex, only words not
        seen before go through the BPE model (`model.tokenize` on the word's
        ByteLevel characters, what `tokenizers` does after splitting), and a
        text's ids are its words' ids joined. Texts that spell a special token
        (which `tokenizers` matches before splitting) go through `tokenizers`
        whole, and so does everything for a tokenizer whose pre-tokenizer is
        not the plain ByteLevel split.
        """
        import numpy as np

        texts = [self._text(t) for t in texts]
        if self._words is None:
            return [np.asarray(ids, dtype=np.uint32) for ids in self._encode_with_tokenizers(texts)]
        direct = [i for i, t in enumerate(texts) if "<|" in t and any(sp in t for sp in SPECIAL_TOKENS)]
        out: list[np.ndarray] = [np.empty(0, dtype=np.uint32)] * len(texts)
        for i, ids in zip(direct, self._encode_with_tokenizers([texts[i] for i in direct])):
            out[i] = np.asarray(ids, dtype=np.uint32)
        skip = set(direct)
        words = [self._words.findall(t) if i not in skip else [] for i, t in enumerate(texts)]
        cache = self._word_ids
        new = set().union(*words) - cache.keys()
        if len(cache) + len(new) > WORD_CACHE_LIMIT:
            cache.clear()
            new = set().union(*words)
        model, byte_level = self._tok.model, self._byte_level
        for w in new:
            tokens = model.tokenize(w.encode("utf-8").decode("latin-1").translate(byte_level))
            cache[w] = np.array([t.id for t in tokens], dtype=np.uint32).tobytes()
        for i, ws in enumerate(words):
            if i not in skip:
                out[i] = np.frombuffer(b"".join(map(cache.__getitem__, ws)), dtype=np.uint32)
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._id_bytes
        return b"".join(table[i] for i in _as_int_list(ids) if 0 <= i < len(table))

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "file": TOKENIZER_FILE, "specials": dict(self.specials)}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _word_splitter(tokenizer: Any) -> Any:
    """The tokenizer's word split as a compiled `regex`, or None when it is not (only)
    GPT-2's ByteLevel split, as `BPETokenizer.train` builds it, with deterministic BPE."""
    config = json.loads(tokenizer.to_str())
    pre = config.get("pre_tokenizer") or {}
    plain = (
        config.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", True)
        and config.get("model", {}).get("type") == "BPE"
        and not config["model"].get("dropout")
    )
    if not plain:
        return None
    import regex

    return regex.compile(BYTE_LEVEL_SPLIT)


AnyTokenizer = Union[ByteTokenizer, BPETokenizer]


def tokenizer_from_spec(spec: dict[str, Any], root: str | Path) -> AnyTokenizer:
    """Build the tokenizer a manifest's `tokenizer` entry describes; files are relative to root."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        name = spec.get("file") or TOKENIZER_FILE
        return BPETokenizer.from_file(Path(root) / name)
    raise TokenizerError(f"unknown tokenizer kind {kind!r} in {root} (expected 'byte' or 'bpe')")


def load_tokenizer(path: str | Path) -> AnyTokenizer:
    """Load a tokenizer from a prepared data folder, its manifest.json, or a saved model folder.

    A manifest names the tokenizer (`tokenizer.kind`, `tokenizer.file`); a folder
    without a manifest holds `tokenizer.json`, either a byte spec written by
    `ByteTokenizer.save` or a Hugging Face BPE file.
    """
    p = Path(path).expanduser()
    from leviathan.run.manifest import MANIFEST_FILE, ManifestError, read_manifest

    manifest = p if p.suffix == ".json" and p.name != TOKENIZER_FILE else p / MANIFEST_FILE
    if manifest.is_file():
        try:
            spec = read_manifest(str(manifest)).tokenizer
        except ManifestError as e:
            raise TokenizerError(str(e)) from None
        return tokenizer_from_spec(spec, manifest.parent)
    file = p if p.name == TOKENIZER_FILE else p / TOKENIZER_FILE
    if not file.is_file():
        raise TokenizerError(f"no {MANIFEST_FILE} or {TOKENIZER_FILE} at {p}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file}: cannot parse ({e})") from None
    if isinstance(data, dict) and data.get("kind") == "byte":
        return ByteTokenizer()
    return BPETokenizer.from_file(file)
