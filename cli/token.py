"""`leviathan token`: issue, revoke and list the API's per-user tokens.

The file (`--file`, default `$LEVIATHAN_API_TOKENS`) holds one JSON line per token
with its sha256, user and role (`api.auth`); a token itself is printed once, when
it is issued, and stored nowhere. The API re-reads the file when it changes, so
neither issuing nor revoking needs a restart. Each change replaces the file
whole, readable by its owner only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from api.auth import ROLES, USER_PATTERN, TokenEntry, hash_token, read_token_file, write_token_file

ENV_FILE = "LEVIATHAN_API_TOKENS"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leviathan token", description="Issue, revoke and list API tokens.")
    sub = parser.add_subparsers(dest="action", required=True)

    def with_file(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--file", type=Path, default=None,
                       help=f"the token file (default: ${ENV_FILE}); issue creates it")
        return p

    issue = with_file(sub.add_parser("issue", help="make a token for a user; print it once"))
    issue.add_argument("--user", required=True, help=f"user name ({USER_PATTERN})")
    issue.add_argument("--role", required=True, choices=ROLES, help="read: read own jobs; submit: also submit and "
                       "stop own jobs; admin: every job")
    revoke = with_file(sub.add_parser("revoke", help="remove tokens: every one of a user, or one given token"))
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="revoke every token of this user")
    who.add_argument("--token", help="revoke this one token (read from stdin when '-')")
    with_file(sub.add_parser("list", help="users, roles and hash prefixes (no tokens)"))
    return parser


def _file(given: Path | None) -> Path:
    if given is not None:
        return given.expanduser()
    env = os.environ.get(ENV_FILE)
    if not env:
        raise ValueError(f"no token file: pass --file or set {ENV_FILE}")
    return Path(env).expanduser()


def _entries(path: Path, missing_ok: bool) -> list[TokenEntry]:
    if missing_ok and not path.exists():
        return []
    return read_token_file(path)


def issue(path: Path, user: str, role: str) -> str:
    """Add a new token for `user` with `role`; return the token (only its hash is written)."""
    token = secrets.token_urlsafe(32)
    entry = TokenEntry.checked({"sha256": hash_token(token), "user": user, "role": role})
    entries = _entries(path, missing_ok=True)
    write_token_file(path, [*entries, entry])
    return token


def revoke(path: Path, user: str | None = None, token: str | None = None) -> int:
    """Remove every token of `user`, or the one `token`; return how many were removed."""
    entries = _entries(path, missing_ok=False)
    digest = hash_token(token) if token is not None else None
    kept = [e for e in entries if not (e.user == user or e.sha256 == digest)]
    if len(kept) != len(entries):
        write_token_file(path, kept)
    return len(entries) - len(kept)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = _file(args.file)
        if args.action == "issue":
            token = issue(path, args.user, args.role)
            print(token)
            print(f"issued a {args.role} token for {args.user} in {path}; it is not shown again", file=sys.stderr)
        elif args.action == "revoke":
            token = sys.stdin.readline().strip() if args.token == "-" else args.token
            n = revoke(path, user=args.user, token=token)
            if n == 0:
                print(f"error: no such token in {path}", file=sys.stderr)
                return 1
            print(f"revoked {n} token{'s' if n != 1 else ''} in {path}", file=sys.stderr)
        else:
            for e in _entries(path, missing_ok=False):
                print(f"{e.user}\t{e.role}\t{e.sha256[:12]}")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
