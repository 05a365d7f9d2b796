"""`leviathan serve`: run the REST API under uvicorn, refusing an open bind without a token.

Imports neither torch nor the job modules: the API process stays light.
"""

from __future__ import annotations

import argparse
import sys

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leviathan serve", description="Run the REST API (uvicorn).")
    parser.add_argument("--host", default=None, help="bind address (default: settings, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: settings, 8000)")
    parser.add_argument(
        "--insecure", action="store_true",
        help="allow a non-loopback bind without LEVIATHAN_API_TOKEN(S) (anyone who reaches the port can submit jobs)",
    )
    return parser


def serve(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    import logging

    import uvicorn
    from pydantic import ValidationError

    from api.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        print(f"error: bad API settings in the environment: {problems}", file=sys.stderr)
        return 2
    host = args.host or settings.host
    if settings.api_tokens is not None:
        from api.auth import read_token_file

        try:
            read_token_file(settings.api_tokens.expanduser())
        except (OSError, ValueError) as e:
            print(f"error: LEVIATHAN_API_TOKENS: {e}", file=sys.stderr)
            return 2
    if host not in LOOPBACK_HOSTS and settings.api_token is None and settings.api_tokens is None:
        if not args.insecure:
            print(
                f"error: refusing to serve on {host} without LEVIATHAN_API_TOKEN or LEVIATHAN_API_TOKENS "
                "(anyone who reaches the port could submit jobs); set a token, bind 127.0.0.1, or pass --insecure",
                file=sys.stderr,
            )
            return 2
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("leviathan.serve").warning(
            "--insecure: serving on %s without an API token; anyone who reaches the port can submit jobs", host
        )
    uvicorn.run("api.app:app", host=host, port=args.port or settings.port)
    return 0
