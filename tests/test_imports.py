"""Import rules import-linter cannot check (it sees external packages only by their top name):
who may import gymnasium, RLlib and Ray Serve; no `rap` module imported by a string; every
import inside a function says why it is there. The package rules are `lint-imports`
(pyproject.toml), run by scripts/lint.sh."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "rap").rglob("*.py"), *(ROOT / "deployments").glob("*.py")])


def _imports(path: Path) -> list[tuple[ast.stmt, str, bool]]:
    """(node, imported module, inside a function) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    inner = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(f)
    }
    out: list[tuple[ast.stmt, str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name, id(node) in inner) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
            out += [(node, n, id(node) in inner) for n in [node.module, *names]]
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_only_the_agent_imports_gymnasium_and_rllib() -> None:
    bad = [
        f"{_rel(p)}:{node.lineno} {name}"
        for p in SOURCES
        for node, name, _ in _imports(p)
        if (name == "gymnasium" or name.startswith("ray.rllib"))
        and not _rel(p).startswith("rap/agent/")
    ]
    assert not bad, bad


def test_the_library_never_imports_ray_serve() -> None:
    """Only deployments/ and the command line (which starts the app) touch Ray Serve."""
    bad = [
        f"{_rel(p)}:{node.lineno} {name}"
        for p in SOURCES
        for node, name, _ in _imports(p)
        if (name.startswith("ray.serve") or name == "fastapi")
        and _rel(p).startswith("rap/")
        and not _rel(p).startswith("rap/cli/")
    ]
    assert not bad, bad


def test_no_rap_module_is_imported_by_a_string() -> None:
    pattern = re.compile(r"""(import_module|__import__)\(\s*f?["'](rap|deployments)\b""")
    bad = [_rel(p) for p in SOURCES if pattern.search(p.read_text())]
    assert not bad, bad


def test_every_import_inside_a_function_says_why() -> None:
    """A lazy import keeps a one-line reason (a heavy or optional dependency, a cycle); the
    others belong at the top of the module, where the import graph shows them."""
    bad = []
    for p in SOURCES:
        lines = p.read_text().splitlines()
        for node, _, inner in _imports(p):
            end = node.end_lineno or node.lineno
            if inner and not any("#" in line for line in lines[node.lineno - 1 : end]):
                bad.append(f"{_rel(p)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "\n".join(sorted(set(bad)))
