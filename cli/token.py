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
    parser = argparse.ArgumentParser(
        prog="leviathan token",
        description="Issue, revoke and list the REST API's per-user tokens.",
        epilog="issue --user U --role R: print a new token once; revoke --user U: every token of U; "
               "revoke --token T (or - for stdin): that one; list: users, roles, hash prefixes.",
    )
    parser.add_argument("action", choices=["issue", "revoke", "list"])
    parser.add_argument("--file", type=Path, default=None,
                        help=f"the token file (default: ${ENV_FILE}); issue creates it")
    parser.add_argument("--user", help=f"user name ({USER_PATTERN})")
    parser.add_argument("--role", choices=ROLES,
                        help="read: list and read own jobs; submit: also submit and stop them; admin: every job")
    parser.add_argument("--token", help="revoke: this one token ('-': read it from stdin)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Which flags each action takes (argparse's usage error, exit 2, otherwise)."""
    if args.action == "issue" and (args.user is None or args.role is None or args.token is not None):
        parser.error("issue takes --user and --role")
    if args.action == "revoke" and ((args.user is None) == (args.token is None) or args.role is not None):
        parser.error("revoke takes one of --user and --token")
    if args.action == "list" and (args.user or args.role or args.token):
        parser.error("list takes only --file")


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
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
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
