"""Who is calling: bearer tokens to principals (a user and a role), and which jobs
a principal may see.

Two sources of tokens, either or both:
- `LEVIATHAN_API_TOKEN`: one token, the user `admin` with the role `admin`;
- `LEVIATHAN_API_TOKENS`: a file of JSON lines, one per token,
  `{"sha256": "<hex of the token>", "user": "alice", "role": "submit"}`
  (blank lines and `#` comments are skipped). Only hashes are stored, so the file
  does not hand out tokens; `leviathan token issue|revoke|list` edits it
  (`cli.token`). It is re-read when its modification time, size or inode changes,
  so issuing or revoking needs no restart.

Roles, each including the one before: `read` lists and reads its user's jobs;
`submit` also submits and stops them; `admin` sees and stops every job, also those
started outside the API. With neither source set the API has no auth and every
caller is an admin (`leviathan serve` refuses that off loopback).

A token is hashed once and compared with every stored hash by
`hmac.compare_digest`, so the time an answer takes does not depend on how much of a
hash matched, nor on which line matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, get_args

from api.errors import AuthUnavailable

log = logging.getLogger(__name__)

Role = Literal["read", "submit", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
META_OWNER = "leviathan_owner"  # Ray job metadata: the user who submitted the job through the API
USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
_USER = re.compile(USER_PATTERN)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Principal:
    """The caller of one request: a user name and a role."""

    user: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may(self, role: Role) -> bool:
        """Whether this principal's role includes `role`."""
        return ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS_ADMIN = Principal("anonymous", "admin")  # an API without tokens
SINGLE_TOKEN_ADMIN = Principal("admin", "admin")  # LEVIATHAN_API_TOKEN


def visible_to(principal: Principal, metadata: Mapping[str, str]) -> bool:
    """Whether `principal` may see (list, read, stop, resume) a job with this Ray
    metadata: admins see every job, anyone else only those they own. A job without an
    owner (submitted outside the API) is an admin's."""
    return principal.is_admin or metadata.get(META_OWNER) == principal.user


def hash_token(token: str) -> str:
    """The sha256 hex digest stored for a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    sha256: str
    user: str
    role: Role

    @classmethod
    def checked(cls, d: object) -> "TokenEntry":
        """An entry from a parsed JSON line; ValueError saying what is wrong."""
        if not isinstance(d, dict) or set(d) != {"sha256", "user", "role"}:
            raise ValueError("want a JSON object with exactly the keys sha256, user, role")
        if not isinstance(d["sha256"], str) or not _HEX64.match(d["sha256"]):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        if not isinstance(d["user"], str) or not _USER.match(d["user"]):
            raise ValueError(f"user must match {USER_PATTERN}")
        if d["role"] not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        return cls(d["sha256"], d["user"], d["role"])

    def to_json(self) -> str:
        return json.dumps({"sha256": self.sha256, "user": self.user, "role": self.role})


def parse_tokens(text: str, source: str = "token file") -> list[TokenEntry]:
    """The entries of a token file's text; ValueError naming the line for anything malformed."""
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise ValueError(f"{source}:{n}: not JSON") from None
        try:
            entries.append(TokenEntry.checked(d))
        except ValueError as e:
            raise ValueError(f"{source}:{n}: {e}") from None
    return entries


def read_token_file(path: Path) -> list[TokenEntry]:
    return parse_tokens(path.read_text(encoding="utf-8"), str(path))


def write_token_file(path: Path, entries: list[TokenEntry]) -> None:
    """Replace the file at once (a reader sees the old or the new one, never half),
    readable by its owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(e.to_json() + "\n" for e in entries))
    os.replace(tmp, path)


class TokenFile:
    """`LEVIATHAN_API_TOKENS`, re-read when the file changes (a `stat` per call otherwise).

    A file that cannot be read or parsed accepts no token (AuthUnavailable, 503) until
    it is fixed: a half-edited file must not keep a revoked token alive.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[TokenEntry] = []
        self._error: str | None = None

    def entries(self) -> list[TokenEntry]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            return self._fail(f"cannot read {self.path}: {e.strerror}")
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._entries, self._error = read_token_file(self.path), None
                except (OSError, UnicodeDecodeError, ValueError) as e:
                    self._entries, self._error = [], str(e)
                    log.error("API token file refused, no file token is accepted: %s", e)
                self._stamp = stamp
            if self._error is not None:
                raise AuthUnavailable("the API's token file cannot be read; ask its operator")
            return self._entries

    def _fail(self, why: str) -> list[TokenEntry]:
        with self._lock:
            if self._error != why:
                log.error("API token file refused, no file token is accepted: %s", why)
            self._stamp, self._error = None, why
        raise AuthUnavailable("the API's token file cannot be read; ask its operator")

    def lookup(self, token: str) -> Principal | None:
        """The principal whose hash matches, comparing against every entry."""
        given = hash_token(token).encode()
        found = None
        for entry in self.entries():
            if hmac.compare_digest(given, entry.sha256.encode()) and found is None:
                found = Principal(entry.user, entry.role)
        return found


class Authenticator:
    """Bearer token -> Principal, from the settings' single token and token file."""

    def __init__(self, single: str | None, token_file: Path | None) -> None:
        self._single = hash_token(single).encode() if single is not None else None
        self.file = TokenFile(token_file) if token_file is not None else None

    @property
    def enabled(self) -> bool:
        return self._single is not None or self.file is not None

    def principal(self, token: str | None) -> Principal | None:
        """Who `token` belongs to: None for no token or an unknown one (401).

        With auth off, every caller is ANONYMOUS_ADMIN.
        """
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if token is None:
            return None
        if self._single is not None and hmac.compare_digest(hash_token(token).encode(), self._single):
            return SINGLE_TOKEN_ADMIN
        return self.file.lookup(token) if self.file is not None else None
