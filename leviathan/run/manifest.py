"""The prepared-data manifest (`manifest.json`, DESIGN section 6), typed and torch-free.

`jobs.prepare` writes it, the spec check, the API, the tokenizer loader and the
workers' staging (`leviathan.data.staging`) read it: all through `Manifest`, so
its fields are spelled and checked once. A field that is missing or of the
wrong type is a `ManifestError` naming the file and the field, e.g.
`.../manifest.json: domains[1].splits.val.tokens: expected an integer`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from leviathan.run import storage

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """A manifest that cannot be read or used; the message names the file and the field."""


def manifest_file(location: str) -> str:
    """The manifest.json of a prepared folder, or `location` itself when it names the file
    (a local path or a pyarrow.fs URI; not checked to exist)."""
    location = str(location)
    return location if location.endswith(".json") else storage.join(location, MANIFEST_FILE)


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    if key not in d or d[key] is None:
        if optional:
            return None
        raise ManifestError(f"{where}.{key}: missing" if where else f"{key}: missing")
    value = d[key]
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    if not ok:
        names = {int: "an integer", str: "a string", dict: "an object", list: "a list", (int, float): "a number"}
        raise ManifestError(f"{f'{where}.' if where else ''}{key}: expected {names.get(kind, kind)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Split:
    """One shard: its file (relative to the prepared folder), token and source byte counts, sha256."""

    file: str
    tokens: int
    bytes: int
    sha256: str | None = None
    documents: int | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Split":
        return cls(
            file=_get(d, "file", str, where),
            tokens=_get(d, "tokens", int, where),
            bytes=_get(d, "bytes", int, where),
            sha256=_get(d, "sha256", str, where, optional=True),
            documents=_get(d, "documents", int, where, optional=True),
        )


@dataclass(frozen=True)
class Domain:
    """One domain: its name, where its text came from, and its train and val shards."""

    name: str
    splits: dict[str, Split]
    source: str | None = None
    documents: int | None = None
    bytes: int | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Domain":
        splits = _get(d, "splits", dict, where)
        return cls(
            name=_get(d, "name", str, where),
            splits={s: Split.from_dict(_get(splits, s, dict, f"{where}.splits"), f"{where}.splits.{s}") for s in SPLITS},
            source=_get(d, "source", str, where, optional=True),
            documents=_get(d, "documents", int, where, optional=True),
            bytes=_get(d, "bytes", int, where, optional=True),
        )


@dataclass(frozen=True)
class Manifest:
    """What a prepared data folder holds: the tokenizer entry, the vocabulary and token dtype,
    and the domains in order. `to_dict` / `from_dict` are the JSON form."""

    tokenizer: dict[str, Any]
    vocab_size: int
    dtype: str
    domains: list[Domain]
    val_fraction: float | None = None
    seq_len: int | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError("expected a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"format_version: {version!r}, expected {FORMAT_VERSION}")
        domains = _get(d, "domains", list, "")
        if not domains:
            raise ManifestError("domains: no domains")
        out = cls(
            tokenizer=dict(_get(d, "tokenizer", dict, "")),
            vocab_size=_get(d, "vocab_size", int, ""),
            dtype=_get(d, "dtype", str, ""),
            domains=[Domain.from_dict(x, f"domains[{i}]") for i, x in enumerate(domains)],
            val_fraction=_get(d, "val_fraction", (int, float), "", optional=True),
            seq_len=_get(d, "seq_len", int, "", optional=True),
        )
        _get(out.tokenizer, "kind", str, "tokenizer")
        names = out.domain_names
        if len(set(names)) != len(names):
            raise ManifestError(f"domains: names repeat ({names})")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            "format_version": d.pop("format_version"), "tokenizer": d.pop("tokenizer"),
            "vocab_size": d.pop("vocab_size"), "dtype": d.pop("dtype"), **d,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise ManifestError(f"domain {name!r}: not in the manifest (has {self.domain_names})")

    def split(self, domain: str, split: str) -> Split:
        if split not in SPLITS:
            raise ManifestError(f"split {split!r}: expected one of {SPLITS}")
        return self.domain(domain).splits[split]

    def bytes_per_token(self, domain: str | None = None, split: str = "val") -> float:
        """Source bytes per token, for bits per byte = loss / ln 2 / bytes_per_token.

        Over one domain's split, or over all domains' `split` when domain is None.
        """
        names = [domain] if domain is not None else self.domain_names
        nbytes = sum(self.split(d, split).bytes for d in names)
        ntokens = sum(self.split(d, split).tokens for d in names)
        return nbytes / max(ntokens, 1)

    def checksums(self) -> dict[str, str | None]:
        """File name (relative to the folder) -> recorded sha256, for every file the manifest
        names: the shards, and the tokenizer file when it has one."""
        out = {sp.file: sp.sha256 for d in self.domains for sp in d.splits.values()}
        if self.tokenizer.get("file"):
            out[self.tokenizer["file"]] = self.tokenizer.get("sha256")
        return out


def parse_manifest(text: str, file: str) -> Manifest:
    """A manifest from its JSON text; ManifestError names `file` and the bad field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{file}: cannot parse ({e})") from None
    try:
        return Manifest.from_dict(data)
    except ManifestError as e:
        raise ManifestError(f"{file}: {e}") from None


def read_manifest(location: str) -> Manifest:
    """Read the manifest of a prepared folder (or its manifest.json), local or a URI."""
    file = manifest_file(location)
    try:
        text = storage.read_text(file)
    except OSError as e:
        raise ManifestError(f"{file}: cannot read ({' '.join(str(e).split())})") from None
    if text is None:
        raise ManifestError(f"no manifest at {file}")
    return parse_manifest(text, file)


def write_manifest(manifest: Manifest, folder: str) -> str:
    """Write `<folder>/manifest.json`; returns its location."""
    file = storage.join(folder, MANIFEST_FILE)
    storage.write_text(file, manifest.to_json())
    return file
