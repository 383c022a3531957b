"""The mutants under mutants/ (scripts/mutants.py): each still applies to the tree and names tests
that exist (fast: a restructuring that moves the code they break fails here at once, and
re-targets them), and each is killed by its tests (slow: about two minutes on two cores)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutants_script", ROOT / "scripts" / "mutants.py")
assert _spec is not None and _spec.loader is not None
mutants = sys.modules["mutants_script"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutants)  # scripts/ is no package (its dataclass needs sys.modules)

PATCHES = sorted(mutants.MUTANTS.glob("*.patch"))


def test_there_are_mutants() -> None:
    assert len(PATCHES) >= 8


@pytest.mark.parametrize("patch", PATCHES, ids=[p.stem for p in PATCHES])
def test_a_mutant_applies_to_the_tree_and_names_tests_that_exist(patch: Path) -> None:
    mutant = mutants.read_mutant(patch)
    assert mutant.what, f"{patch.name}: its header has no '# Mutant: WHAT' line"
    for node in mutant.tests:
        path, _, name = node.partition("::")
        assert (ROOT / path).is_file(), f"{patch.name} names {path}, which does not exist"
        assert f"def {name}(" in (ROOT / path).read_text(), f"{patch.name}: no test {node}"
    check = subprocess.run(
        ["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, (
        f"{patch.name} no longer applies ({check.stderr.strip()}): make the same mutation in "
        "the code as it is now and replace the patch's diff (scripts/mutants.py says how)"
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_mutant_is_killed() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mutants.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
