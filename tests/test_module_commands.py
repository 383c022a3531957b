"""Every `-m rap....` command in the scripts and the docs runs something: the layout change
moved the surrogate fit to `rap.agent.surrogate_fit`, and `scripts/train_policy.sh` went on
calling `python -m rap.planning.surrogate`, which imports and exits 0 — every DAgger round
silently skipped its refit."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [*ROOT.glob("scripts/*.sh"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]
MODULES = sorted(
    {m for f in FILES for m in re.findall(r"-m (rap(?:\.[a-z0-9_]+)+)", f.read_text())}
)


def test_the_scripts_and_docs_name_modules() -> None:
    assert "rap.agent.surrogate_fit" in MODULES and "rap.importance.quality" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_every_module_command_has_a_main(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} does not exist"
    origin = Path(spec.origin)
    if origin.name == "__init__.py":
        origin = origin.parent / "__main__.py"
        assert origin.is_file(), f"package {module} has no __main__.py"
        return
    assert 'if __name__ == "__main__":' in origin.read_text(), f"{module} runs nothing"
