"""The README and the command line agree: every `leviathan` / `python -m jobs.*` command
the README shows takes the flags it shows, every spec field it names exists, every
endpoint (and query parameter) it names is served, and no error message suggests a
flag its command does not take."""

from __future__ import annotations

import argparse
import re
import tomllib
import typing
from collections.abc import Callable, Iterator

import pytest
from pydantic import BaseModel

from api.app import create_app
from api.settings import Settings
from cli.main import COMMANDS, main
from jobs.spec import JobSpec
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """Each command's argument parser, by the name the README runs it under."""
    from cli import runs, serve, token
    from jobs import compare, deploy, evaluate, generate, prepare, prepare_ray, serve_model, synthetic, train, tune

    return {
        "prepare": prepare.base_parser,
        "prepare --ray": prepare_ray.build_parser,
        "train": train.build_parser,
        "evaluate": evaluate.build_parser,
        "compare": compare.build_parser,
        "generate": generate.build_parser,
        "tune": tune.build_parser,
        "synthetic": synthetic.build_parser,
        "deploy": deploy.build_parser,
        "serve": serve.build_parser,
        "serve-model": serve_model.build_parser,
        "token": token.build_parser,
        "runs": runs.build_parser,
    }


def flags_of(command: str) -> set[str]:
    parser = _parsers()[command]()
    return {option for action in parser._actions for option in action.option_strings}


# ----------------------------------------------------------------------------- reading the README


def fenced_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, body) of every ``` block."""
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        yield m.group(1), m.group(2)


def code_snippets(text: str) -> list[str]:
    """Shell lines of the fenced blocks (continuations joined) and every inline code span."""
    snippets = []
    for _, body in fenced_blocks(text):
        snippets += body.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.M | re.S)
    snippets += re.findall(r"`([^`\n]+)`", prose)
    return snippets


def commands_in(snippet: str) -> Iterator[tuple[str, list[str]]]:
    """(command, flags) of each `leviathan CMD ...` / `python -m jobs.CMD ...` in a snippet;
    a command runs to the end of the line, a shell separator or a comment."""
    pattern = r"(?:(?<![\w.-])(?<!from )leviathan +(?P<cli>[a-z]+(?:-[a-z]+)*)|python -m jobs\.(?P<module>[a-z_]+))(?P<rest>[^;&|#`]*)"
    for m in re.finditer(pattern, snippet):
        name = m.group("cli") or m.group("module")
        if m.group("module") == "prepare_ray":
            name = "prepare --ray"
        rest = m.group("rest")
        if name == "prepare" and "--ray" in FLAG.findall(rest):
            name = "prepare --ray"
        yield name, FLAG.findall(rest)


def readme_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for snippet in code_snippets(README):
        for name, flags in commands_in(snippet):
            found.append((snippet.strip()[:80], name, flags))
    return found


def test_the_readme_shows_every_command():
    shown = {name.split()[0] for _, name, _ in readme_commands()}
    assert set(COMMANDS) <= shown, sorted(set(COMMANDS) - shown)


@pytest.mark.parametrize("snippet,command,flags", readme_commands(), ids=lambda v: str(v)[:40])
def test_every_command_the_readme_shows_takes_its_flags(snippet, command, flags):
    assert command in _parsers(), f"{snippet!r}: no command {command!r}"
    unknown = sorted(set(flags) - flags_of(command))
    assert not unknown, f"{snippet!r}: `leviathan {command}` takes no {unknown}"


# ----------------------------------------------------------------------------- spec fields


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (itself, or inside list[...] / X | None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_in(arg)
        if model is not None:
            return model
    return None


def spec_field_exists(dotted: str) -> bool:
    """Whether `a.b.c` names a JobSpec field (list items by index: `ensemble.members.0.preset`)."""
    model: type[BaseModel] | None = JobSpec
    for part in dotted.split("."):
        if part.isdigit():
            continue
        if model is None or part not in model.model_fields:
            return False
        model = _model_in(model.model_fields[part].annotation)
    return True


SECTIONS = tuple(name for name, f in JobSpec.model_fields.items() if _model_in(f.annotation) is not None)
SPEC_FIELD = re.compile(rf"(?<![\w./-])(?:{'|'.join(SECTIONS)})\.[a-z_][a-z0-9_.]*[a-z0-9_]")


def readme_spec_fields() -> list[str]:
    names = set()
    for snippet in code_snippets(README):
        names.update(SPEC_FIELD.findall(snippet))
    return sorted(names)


def test_the_field_reader_finds_fields_and_refuses_others():
    assert {"data.manifest", "training.eval_batches", "ensemble.members.0.preset"} <= set(readme_spec_fields())
    assert spec_field_exists("ensemble.members.0.preset") and not spec_field_exists("training.epochs")


@pytest.mark.parametrize("name", readme_spec_fields())
def test_every_spec_field_the_readme_names_exists(name):
    assert spec_field_exists(name), f"the README names spec field {name!r}, which JobSpec does not have"


@pytest.mark.parametrize("body", [body for lang, body in fenced_blocks(README) if lang == "toml"],
                         ids=lambda body: body.splitlines()[0])
def test_every_toml_spec_in_the_readme_is_a_valid_spec(body):
    JobSpec.model_validate(tomllib.loads(body))


# ----------------------------------------------------------------------------- endpoints


ENDPOINT = re.compile(r"(?:\b(?P<method>GET|POST|PUT|PATCH|DELETE)\s+|localhost:\d+)(?P<path>/[\w/{}.-]*)(?:\?(?P<query>[^\s`)]*))?")


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path.rstrip("/") or "/")


def served() -> dict[str, dict[str, set[str]]]:
    """Path shape -> method -> its query parameters."""
    openapi = create_app(Settings(ray_address="http://127.0.0.1:8265")).openapi()
    routes: dict[str, dict[str, set[str]]] = {}
    for path, operations in openapi["paths"].items():
        for method, op in operations.items():
            query = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
            routes.setdefault(_shape(path), {})[method.upper()] = query
    return routes


def readme_endpoints() -> list[tuple[str | None, str, list[str]]]:
    found = []
    for snippet in code_snippets(README):
        for m in ENDPOINT.finditer(snippet):
            query = [pair.split("=")[0] for pair in (m.group("query") or "").split("&") if pair]
            found.append((m.group("method"), m.group("path"), query))
    return found


def test_the_readme_names_endpoints():
    assert {("POST", "/v1/jobs"), ("GET", "/v1/jobs/{id}/logs"), ("GET", "/healthz")} <= {
        (method, path) for method, path, _ in readme_endpoints()}


@pytest.mark.parametrize("method,path,query", readme_endpoints(), ids=str)
def test_every_endpoint_the_readme_names_is_served(method, path, query):
    routes = served()
    assert _shape(path) in routes, f"the README names {path}, which the API does not serve"
    methods = routes[_shape(path)]
    if method is not None:
        assert method in methods, f"the README names {method} {path}; the API serves {sorted(methods)}"
        unknown = sorted(set(query) - methods[method])
        assert not unknown, f"{method} {path} takes no query parameter {unknown}"


# ----------------------------------------------------------------------------- error messages


def _error_line(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "error" in line]
    return line


GIANT = str(REPO_ROOT / "jobs" / "specs" / "giant.toml")


@pytest.mark.parametrize(
    "command,argv",
    [
        ("train", ["train", "--spec", GIANT]),
        ("deploy", ["deploy", "--spec", GIANT, "--target", "kuberay", "--out", "{tmp}"]),
        ("tune", ["tune", "--spec", GIANT, "--trials", "1"]),
        ("compare", ["compare", "--spec", GIANT]),
        ("prepare", ["prepare", "--domain", "d={tmp}"]),
        ("prepare", ["prepare", "--domain", "d={tmp}", "--glob", "*.a", "--glob", "*.b", "--out", "{tmp}/o"]),
        ("prepare", ["prepare", "--domain", "d", "--out", "{tmp}/o"]),
        ("serve", ["serve", "--host", "0.0.0.0", "--port", "1"]),
    ],
)
def test_error_messages_suggest_only_flags_their_command_takes(command, argv, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LEVIATHAN_API_TOKEN", raising=False)
    monkeypatch.setenv("LEVIATHAN_RAY_ADDRESS", "http://127.0.0.1:9")
    line = _error_line([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    # A message may quote another command (`leviathan prepare --out URI`): its flags are that command's.
    for quoted in re.findall(r"`([^`]*)`", line):
        for other, flags in commands_in(quoted):
            assert set(flags) <= flags_of(other), f"{line!r} quotes `{quoted}`, which {other} does not take"
    own = re.sub(r"`[^`]*`", "", line)
    suggested = set(FLAG.findall(own))
    assert suggested, f"expected the error to name a flag: {line}"
    unknown = sorted(suggested - flags_of(command))
    assert not unknown, f"`leviathan {command}` says {line!r}, but takes no {unknown}"


def test_the_flag_reader_sees_a_flag_a_command_lacks():
    assert ("deploy", ["--spec", "--nope"]) in list(commands_in("leviathan deploy --spec x --nope"))
    assert "--nope" not in flags_of("deploy")
