"""The layers of DESIGN section 1: imports only go down api -> jobs -> cluster -> leviathan,
and the API reaches the model library only through its torch-free modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each layer must never import (top-level package names), anywhere in the file.
FORBIDDEN = {
    "leviathan": {"ray", "fastapi", "uvicorn", "cluster", "jobs", "api"},
    "cluster": {"fastapi", "uvicorn", "jobs", "api"},
    "jobs": {"fastapi", "uvicorn", "api"},
    "api": {"torch", "cluster"},
}


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
