"""Loading prepared data for training and evaluation: the manifest's files on this machine.

A prepared folder on local disk is read in place. A manifest on remote storage
(a pyarrow.fs URI) gets a local staging folder: a file is downloaded there on
first use, checked against the manifest's sha256 and only then renamed into
place, so a file present there is a verified copy and each node downloads it
once. The manifest itself is `leviathan.run.manifest.Manifest`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leviathan.data.shards import DataError, TokenShard, sha256_file
from leviathan.run import env, storage
from leviathan.run.manifest import MANIFEST_FILE, Manifest, ManifestError, manifest_file, parse_manifest


def staging_root() -> Path:
    """Where manifests on remote storage are staged: `$LEVIATHAN_STAGING_DIR`, else
    `<temp dir>/leviathan-staged` (node-local disk, shared by the workers of a node)."""
    return Path(os.environ.get(env.STAGING_DIR) or Path(tempfile.gettempdir()) / "leviathan-staged")


@dataclass
class PreparedData:
    """A prepared data folder: its `manifest` and `root`, the local folder its files are read from
    (a staging folder when the manifest is remote; `source` is then its folder's URI)."""

    root: Path
    manifest: Manifest
    source: str | None = None

    @property
    def location(self) -> str:
        """The manifest's folder as the user named it (the URI for remote manifests)."""
        return self.source or str(self.root)

    @property
    def domains(self) -> list[str]:
        return self.manifest.domain_names

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        return dict(self.manifest.tokenizer)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.dtype)

    def _split(self, domain: str, split: str):
        try:
            return self.manifest.split(domain, split)
        except ManifestError as e:
            raise DataError(f"{self.location}/{MANIFEST_FILE}: {e}") from None

    def shard_path(self, domain: str, split: str) -> Path:
        """The shard's local path (staged first when the manifest is remote)."""
        return self.local_file(self._split(domain, split).file)

    def shard(self, domain: str, split: str) -> TokenShard:
        return TokenShard(self.shard_path(domain, split))

    def tokens(self, domain: str, split: str) -> int:
        return self._split(domain, split).tokens

    def bytes_per_token(self, domain: str | None = None, split: str = "val") -> float:
        if domain is not None:
            self._split(domain, split)
        return self.manifest.bytes_per_token(domain, split)

    def tokenizer(self):
        from leviathan.data.tokenizer import tokenizer_from_spec

        if self.tokenizer_spec.get("file"):
            self.local_file(self.tokenizer_spec["file"])
        return tokenizer_from_spec(self.tokenizer_spec, self.root)

    def checksums(self) -> dict[str, str | None]:
        return self.manifest.checksums()

    def local_file(self, name: str) -> Path:
        """`root / name`; for a remote manifest, downloaded and verified first unless already staged."""
        path = self.root / name
        if self.source is None or path.is_file():
            return path
        expected = self.checksums().get(name)
        if expected is None:
            raise DataError(f"{self.location}/{MANIFEST_FILE}: no sha256 for {name}, so it cannot be staged safely")
        _stage(storage.join(self.source, name), path, expected)
        return path

    def verify(self) -> None:
        """Recompute every sha256 the manifest records; raises DataError naming the first mismatch."""
        for name, expected in self.checksums().items():
            if expected is None:
                continue
            got = sha256_file(self.local_file(name))
            if got != expected:
                raise DataError(f"{self.root / name}: sha256 mismatch (manifest {expected[:12]}..., file {got[:12]}...)")


def _stage(source: str, dest: Path, sha256: str) -> None:
    """Download `source` to `dest` through a private temp file, renamed into place only
    when its sha256 matches (concurrent stagers each rename a verified copy)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
    try:
        storage.download(source, tmp)
        got = sha256_file(tmp)
        if got != sha256:
            raise DataError(f"{source}: sha256 mismatch (manifest {sha256[:12]}..., downloaded {got[:12]}...); not staged")
        os.replace(tmp, dest)
    except OSError as e:
        raise DataError(f"{source}: cannot stage it to {dest} ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_manifest(path: str | Path) -> PreparedData:
    """Read a manifest and check that every file it names exists.

    `path` is the prepared folder or its manifest.json, a local path or a
    pyarrow.fs URI. A remote manifest is read in place; its files are staged to
    `staging_root()` when first used.
    """
    file = manifest_file(str(path))
    try:
        text = storage.read_text(file)
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e})") from None
    if text is None:
        raise DataError(f"no manifest at {file}")
    try:
        manifest = parse_manifest(text, file)
    except ManifestError as e:
        raise DataError(str(e)) from None
    local = storage.local_path(file)
    if local is not None:
        data = PreparedData(root=local.parent.resolve(), manifest=manifest)
    else:
        folder = file.rsplit("/", 1)[0]
        key = hashlib.sha256(f"{folder}\n{text}".encode()).hexdigest()[:16]
        data = PreparedData(root=staging_root() / key, manifest=manifest, source=folder)
    for name in data.checksums():
        if not storage.is_file(storage.join(data.location, name)):
            raise DataError(f"{file}: missing file {storage.join(data.location, name)}")
    return data
