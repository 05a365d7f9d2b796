"""The `leviathan` command's arguments: the dispatch table, `deploy`'s overrides like
`train`'s, and `prepare`'s per-domain file patterns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import COMMANDS, main
from tests.conftest import REPO_ROOT

GIANT = REPO_ROOT / "jobs" / "specs" / "giant.toml"
SMALL = ["--val-fraction", "0.2", "--seq-len", "16"]


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error" in line]


def test_help_lists_every_command_and_an_unknown_one_is_a_one_line_error(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS), out
    assert main(["fly"]) == 2
    (line,) = _errors(capsys)
    assert "unknown command 'fly'" in line


def test_deploy_takes_storage_and_manifest_like_train(tmp_path, capsys):
    args = ["deploy", "--spec", str(GIANT), "--target", "kuberay", "--out", str(tmp_path)]
    assert main(args) == 2
    (line,) = _errors(capsys)
    assert "placeholder" in line and "--storage" in line, line  # the error names a flag deploy takes
    assert main([*args, "--storage", "s3://bucket/runs", "--manifest", "s3://bucket/data/giant"]) == 0
    written = (tmp_path / "giant.rayjob.yaml").read_text()
    assert "s3://bucket/runs" in written and "s3://bucket/data/giant" in written


def _folder(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_prepare_takes_a_file_pattern_per_domain(tmp_path, capsys):
    code = _folder(tmp_path / "code", {"a.py": "def f(x):\n    return x\n" * 40, "notes.txt": "NOT CODE " * 200})
    prose = _folder(tmp_path / "prose", {"deep/a.txt": "the cat sat on the mat. " * 40, "b.py": "import os\n" * 200})
    out = tmp_path / "out"
    argv = ["prepare", "--domain", f"code={code}:*.py", "--domain", f"prose={prose}:*.txt", "--out", str(out), *SMALL]
    assert main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    sources = {d["name"]: d["source"] for d in manifest["domains"]}
    assert sources == {"code": f"folder:{code.resolve()} (*.py)", "prose": f"folder:{prose.resolve()} (*.txt)"}
    # Only the matching files were read: each domain holds its own file's bytes.
    read = {d["name"]: (d["documents"], d["bytes"]) for d in manifest["domains"]}
    assert read == {"code": (1, len("def f(x):\n    return x\n" * 40)), "prose": (1, len("the cat sat on the mat. " * 40))}


def test_prepare_refuses_a_repeated_glob(tmp_path, capsys):
    argv = ["prepare", "--domain", f"d={tmp_path}", "--glob", "*.py", "--glob", "*.txt", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    (line,) = _errors(capsys)
    assert "--glob given twice" in line and "--domain NAME=PATH:GLOB" in line, line


@pytest.mark.parametrize(
    "value,expected",
    [
        ("d=/data/x", ("d", "/data/x", None)),
        ("d=/data/x:*.md", ("d", "/data/x", "*.md")),
        ("d=/data/odd:name/x", ("d", "/data/odd:name/x", None)),  # a ':' before a '/' is the path's
        ("d=/data/notes:v2.txt:", ("d", "/data/notes:v2.txt", None)),  # a trailing ':' keeps the path whole
    ],
)
def test_domain_values_split_name_path_and_pattern(value, expected):
    from jobs.prepare import parse_domains

    assert parse_domains([value]) == [expected]
    assert parse_domains([value], "*.rst")[0][2] == (expected[2] or "*.rst")


def test_prepare_ray_is_reached_from_the_cli_and_the_plain_module_points_there(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--ray", "--help"])
    assert e.value.code == 0 and "leviathan prepare --ray" in capsys.readouterr().out
    from jobs.prepare import main as prepare_main

    assert prepare_main(["--ray", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m jobs.prepare_ray" in err
