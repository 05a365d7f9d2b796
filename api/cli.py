"""The `leviathan` command: a thin shell over the job entrypoints and the API server.

Each subcommand hands its arguments to the matching `jobs.<name>.main`, so
`leviathan train --spec X` and `python -m jobs.train --spec X` are one code
path. Job modules are imported only when their subcommand runs: `leviathan
serve` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

JOB_COMMANDS = {
    "prepare": "Tokenise text into per-domain token shards (jobs.prepare).",
    "train": "Train an ensemble on Ray Train (jobs.train); no spec: the built-in demo.",
    "evaluate": "Evaluate a finished run: merged vs members vs mixtures (jobs.evaluate).",
    "compare": "Train one spec per mixer (correlation vs attention) and compare (jobs.compare).",
    "generate": "Sample text from a trained ensemble or one member (jobs.generate).",
    "tune": "Sweep a spec's hyper-parameters with Ray Tune (jobs.tune).",
    "deploy": "Write KubeRay / `ray up` files that run a spec on a cluster (jobs.deploy).",
}


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="leviathan serve", description="Run the REST API (uvicorn).")
    parser.add_argument("--host", default=None, help="bind address (default: settings, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: settings, 8000)")
    parser.add_argument(
        "--insecure", action="store_true",
        help="allow a non-loopback bind without LEVIATHAN_API_TOKEN (anyone who reaches the port can submit jobs)",
    )
    args = parser.parse_args(argv)

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
    if host not in LOOPBACK_HOSTS and settings.api_token is None:
        if not args.insecure:
            print(
                f"error: refusing to serve on {host} without LEVIATHAN_API_TOKEN (anyone who reaches "
                "the port could submit jobs); set a token, bind 127.0.0.1, or pass --insecure",
                file=sys.stderr,
            )
            return 2
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("leviathan.serve").warning(
            "--insecure: serving on %s without an API token; anyone who reaches the port can submit jobs", host
        )
    uvicorn.run("api.app:app", host=host, port=args.port or settings.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = "\n".join(f"  {name:<9} {text}" for name, text in {**JOB_COMMANDS, "serve": "Run the REST API."}.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: leviathan COMMAND [ARGS]\n\ncommands:\n{commands}\n\n`leviathan COMMAND --help` for each.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command not in JOB_COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join([*JOB_COMMANDS, 'serve'])}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jobs.{command}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
