"""The layers of DESIGN section 1: imports only go down cli -> api -> jobs -> cluster -> leviathan,
the API reaches the model library only through its torch-free modules, and no module
imports by name at run time (importlib), which would hide an import from these checks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each layer must never import (top-level package names), anywhere in the file.
FORBIDDEN = {
    "leviathan": {"ray", "fastapi", "uvicorn", "cluster", "jobs", "api", "cli"},
    "cluster": {"fastapi", "uvicorn", "jobs", "api", "cli"},
    "jobs": {"fastapi", "uvicorn", "api", "cli"},
    "api": {"torch", "cluster", "cli"},
    "cli": {"torch", "ray", "cluster"},  # the shell: it reaches jobs and the API, nothing below them
}
PACKAGES = sorted(FORBIDDEN)


# The model library's torch-free modules: the package itself, its configs, and every run contract.
TORCH_FREE = {"leviathan", "leviathan.config", "leviathan.run"} | {
    f"leviathan.run.{path.stem}" for path in (ROOT / "leviathan" / "run").glob("*.py") if path.stem != "__init__"
}


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Full names of every absolute import in a file, lazy imports inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module.split(".")[0] == "leviathan":  # `from leviathan.run import storage` imports leviathan.run.storage
                names.update(f"{node.module}.{alias.name}" for alias in node.names if is_module(f"{node.module}.{alias.name}"))
    return names


def _relative(arg: ast.expr) -> bool:
    """A module name that starts with "." (literal or f-string): the package's own submodule."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value.startswith(".")
    if isinstance(arg, ast.JoinedStr) and arg.values:
        first = arg.values[0]
        return isinstance(first, ast.Constant) and str(first.value).startswith(".")
    return False


def dynamic_imports(path: Path) -> list[str]:
    """Each run-time import by name in a file (`import_module(...)`, `__import__(...)`) that
    can reach outside its own package, as `line: name`: such an import is invisible to the
    checks above. A package lazily loading its own submodule (a name starting with ".") may."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name in ("import_module", "__import__") and not (node.args and _relative(node.args[0])):
            found.append(f"{node.lineno}: {name}")
    return found


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file."""
    return {name.split(".")[0] for name in imported_modules(path)}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_only_go_down_the_layers(layer: str) -> None:
    broken = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[layer])
        for path in sorted((ROOT / layer).rglob("*.py"))
    }
    broken = {file: names for file, names in broken.items() if names}
    assert not broken, f"{layer}/ imports what lies above it or outside it: {broken}"


@pytest.mark.parametrize("layer", PACKAGES)
def test_no_module_imports_by_name_at_run_time(layer: str) -> None:
    found = {str(p.relative_to(ROOT)): dynamic_imports(p) for p in sorted((ROOT / layer).rglob("*.py"))}
    found = {file: lines for file, lines in found.items() if lines}
    assert not found, f"{layer}/ imports by name at run time, which the layer checks cannot see: {found}"


def test_the_cli_reaches_every_job_through_a_plain_import() -> None:
    from cli.main import COMMANDS

    jobs = {p.stem for p in (ROOT / "jobs").glob("*.py")} & set(COMMANDS)
    imported = imported_modules(ROOT / "cli" / "main.py")
    assert {f"jobs.{name}" for name in jobs} <= imported, sorted(imported)
    assert "serve" in COMMANDS and "cli.serve" in imported


def test_the_cli_help_and_serve_stay_torch_free() -> None:
    code = "import sys, cli.main, cli.serve, api.app; print(sorted(m for m in ('torch', 'ray.train') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"the CLI shell pulled in {out.stdout.strip()}"


def test_api_uses_only_the_torch_free_modules_of_the_model_library() -> None:
    used = {
        str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path) if n.split(".")[0] == "leviathan")
        for path in sorted((ROOT / "api").rglob("*.py"))
    }
    broken = {file: names for file, names in used.items() if set(names) - TORCH_FREE}
    assert not broken, f"api/ imports model-library modules that need torch: {broken}"


def test_torch_free_modules_import_without_torch() -> None:
    code = f"import sys, {', '.join(sorted(TORCH_FREE))}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"the torch-free modules pulled in {out.stdout.strip()}"


def test_model_library_imports_without_ray_or_web_stack() -> None:
    code = (
        "import sys, leviathan, leviathan.data.shards, leviathan.data.tokenizer, leviathan.evaluation; "
        "print(sorted(m for m in ('ray', 'fastapi', 'uvicorn', 'api', 'jobs', 'cluster') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing leviathan pulled in {out.stdout.strip()}"


def test_job_spec_imports_without_torch_or_ray() -> None:
    code = "import sys, jobs.spec; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"jobs.spec pulled in {out.stdout.strip()}"
