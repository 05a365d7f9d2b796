"""The `leviathan` command: a thin shell over the job entrypoints and the API server.

It sits above api/ and jobs/ and belongs to neither. Each subcommand hands its
arguments to the matching `jobs.<name>.main`, so `leviathan train --spec X` and
`python -m jobs.train --spec X` are one code path. COMMANDS maps each name to a
function that imports its job module when it runs (a plain import the layer test
reads): `leviathan serve` and `leviathan --help` never import torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _prepare(argv: list[str]) -> int:
    if "--ray" in argv:
        from jobs.prepare_ray import main as main_ray

        return main_ray(argv)
    from jobs.prepare import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from jobs.train import main

    return main(argv)


def _evaluate(argv: list[str]) -> int:
    from jobs.evaluate import main

    return main(argv)


def _compare(argv: list[str]) -> int:
    from jobs.compare import main

    return main(argv)


def _generate(argv: list[str]) -> int:
    from jobs.generate import main

    return main(argv)


def _tune(argv: list[str]) -> int:
    from jobs.tune import main

    return main(argv)


def _synthetic(argv: list[str]) -> int:
    from jobs.synthetic import main

    return main(argv)


def _deploy(argv: list[str]) -> int:
    from jobs.deploy import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from cli.serve import serve

    return serve(argv)


def _serve_model(argv: list[str]) -> int:
    from jobs.serve_model import main

    return main(argv)


def _runs(argv: list[str]) -> int:
    from cli.runs import main

    return main(argv)


def _token(argv: list[str]) -> int:
    from cli.token import main

    return main(argv)


# name -> (entry, one-line help)
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "prepare": (_prepare, "Tokenise text into per-domain token shards (jobs.prepare)."),
    "train": (_train, "Train an ensemble on Ray Train (jobs.train); no spec: the demo; --resume NAME continues."),
    "evaluate": (_evaluate, "Evaluate a finished run: merged vs members vs mixtures (jobs.evaluate)."),
    "compare": (_compare, "Train one spec per mixer (correlation vs attention) and compare (jobs.compare)."),
    "generate": (_generate, "Sample text from a trained ensemble or one member (jobs.generate)."),
    "tune": (_tune, "Sweep a spec's hyper-parameters with Ray Tune (jobs.tune)."),
    "synthetic": (_synthetic, "Synthetic recall tasks: attention against correlation, one run or a grid (jobs.synthetic)."),
    "deploy": (_deploy, "Write KubeRay / `ray up` files that run a spec on a cluster (jobs.deploy)."),
    "serve": (_serve, "Run the REST API (uvicorn)."),
    "serve-model": (_serve_model, "Deploy a trained run on Ray Serve for POST /v1/runs/{name}/generate (jobs.serve_model)."),
    "runs": (_runs, "List, show and delete the runs under a storage root (GET/DELETE /v1/runs)."),
    "token": (_token, "Issue, revoke and list the REST API's per-user tokens (LEVIATHAN_API_TOKENS)."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        listing = "\n".join(f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items())
        print(f"usage: leviathan COMMAND [ARGS]\n\ncommands:\n{listing}\n\n`leviathan COMMAND --help` for each.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    entry, _ = COMMANDS[command]
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
