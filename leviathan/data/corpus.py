"""The built-in corpus: four clearly different domains from text every CPython 3.10+ has.

So the demo runs offline on a fresh machine, the default data comes from the
running interpreter's own standard library; nothing is downloaded. Every domain
lists its documents in a fixed order (sorted relative paths, sorted keys,
ascending code points), so the corpus is deterministic for a given Python
installation, and each domain is capped at `DOMAIN_CAP` bytes (whole documents,
in order, until the next one would pass the cap) so preparing it takes seconds.

Domains (module i of the demo ensemble trains on domain i):

- ``python``: Python source code, the standard library's top-level modules
  (``<stdlib>/*.py``, one document per file; installation-specific files such
  as ``_sysconfigdata*`` and ``sitecustomize.py`` left out).
- ``docs``: English technical prose, the help topics of ``pydoc_data.topics``
  (the language reference text behind ``help("if")``; one document per topic).
- ``codecs``: machine-generated lookup tables, the ``encodings`` package's
  codec modules (``<stdlib>/encodings/*.py``: charmap tables that map byte
  values to code points with the Unicode name of each character in a comment).
- ``unicode``: multilingual UTF-8, the Unicode character database compiled
  into ``unicodedata``: one line ``U+XXXX<TAB>char<TAB>category<TAB>NAME`` per
  named code point of planes 0, 1 and 14 (algorithmically named ideographs and
  syllables left out),
  one document per block of 256 code points, so most lines carry a non-ASCII
  character.

Sizes on CPython 3.11 (pyenv 3.11.7 and Debian's 3.11.2 alike): python 2.0 MB
(the first 76 modules in sorted order, cut at the cap), docs 0.47 MB (79
topics), codecs 1.4 MB (122 modules), unicode 1.4 MB (166 blocks, Unicode 14.0).
Byte-level, that is about 5.3 million tokens.
"""

from __future__ import annotations

import sys
import sysconfig
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAIN_CAP = 2 * 1024 * 1024
"""Bytes per built-in domain at most (about 6 MB in all with the small `docs`)."""

_PLATFORM_FILES = ("_sysconfigdata", "sitecustomize", "usercustomize", "_distutils_system_mod")
_ALGORITHMIC_NAMES = (
    "CJK UNIFIED IDEOGRAPH-",
    "CJK COMPATIBILITY IDEOGRAPH-",
    "HANGUL SYLLABLE ",
    "TANGUT IDEOGRAPH-",
    "KHITAN SMALL SCRIPT CHARACTER-",
    "NUSHU CHARACTER-",
)


@dataclass(frozen=True)
class BuiltinDomain:
    name: str
    description: str
    documents: Callable[[], Iterator[bytes]]  # a fresh iterator over the uncapped documents


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_sources() -> Iterator[bytes]:
    for path in sorted(stdlib_dir().glob("*.py")):
        if not path.name.startswith(_PLATFORM_FILES):
            yield path.read_bytes()


def pydoc_topics() -> Iterator[bytes]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key].encode("utf-8")


def codec_tables() -> Iterator[bytes]:
    for path in sorted((stdlib_dir() / "encodings").glob("*.py")):
        yield path.read_bytes()


UNICODE_PLANES = (0, 1, 14)
"""Planes whose named characters form the `unicode` domain: the basic and supplementary
multilingual planes and the special-purpose plane (tags, variation selectors). The
other planes hold only algorithmically named ideographs or private-use code points;
leaving them out also keeps collecting the domain fast (200k code points, not 1.1M)."""


def unicode_names(block: int = 256) -> Iterator[bytes]:
    bases = (base for plane in UNICODE_PLANES for base in range(plane << 16, (plane + 1) << 16, block))
    for base in bases:
        lines = []
        for cp in range(base, base + block):
            ch = chr(cp)
            name = unicodedata.name(ch, "")
            if not name or name.startswith(_ALGORITHMIC_NAMES):
                continue
            lines.append(f"U+{cp:04X}\t{ch}\t{unicodedata.category(ch)}\t{name}\n")
        if lines:
            yield "".join(lines).encode("utf-8", errors="surrogatepass")


BUILTIN_DOMAINS: tuple[BuiltinDomain, ...] = (
    BuiltinDomain("python", "stdlib top-level modules (<stdlib>/*.py)", python_sources),
    BuiltinDomain("docs", "pydoc_data.topics help text", pydoc_topics),
    BuiltinDomain("codecs", "stdlib codec tables (<stdlib>/encodings/*.py)", codec_tables),
    BuiltinDomain("unicode", f"unicodedata {unicodedata.unidata_version} character names", unicode_names),
)


def capped(documents: Iterator[bytes], cap: int = DOMAIN_CAP) -> Iterator[bytes]:
    """Whole non-empty documents in order until the next one would pass `cap` bytes.

    The first document is always kept (cut to `cap` if it alone is larger).
    """
    total = 0
    for doc in documents:
        if not doc:
            continue
        if total + len(doc) > cap:
            if total == 0:
                yield doc[:cap]
            return
        total += len(doc)
        yield doc


def builtin_corpus(cap: int = DOMAIN_CAP) -> dict[str, list[bytes]]:
    """{domain: [document bytes, ...]} for every built-in domain, in order."""
    return {d.name: list(capped(d.documents(), cap)) for d in BUILTIN_DOMAINS}


def corpus_version() -> str:
    """What the built-in corpus depends on: the Python version (and the Unicode database's)."""
    return f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}-unicode-{unicodedata.unidata_version}"
