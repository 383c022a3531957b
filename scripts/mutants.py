"""Mutants the engine's tests must kill: each patch under mutants/ breaks one behaviour on purpose,
and the tests its header names must then fail.

Usage: .venv/bin/python scripts/mutants.py            every mutant (exit 1 if one survives)
       .venv/bin/python scripts/mutants.py --each     every named test must fail on its own
       .venv/bin/python scripts/mutants.py 03 greedy  only mutants whose file name contains these

For each patch: the repository's tracked files are copied into a scratch folder (the working
tree's content: never a git worktree, other people use the checkout's git), the patch is applied
there with `git apply`, and the tests named in its header (`# test: NODE_ID` lines) run there
with this repository's .venv python (`pytest -x -q -p no:cacheprovider`). A mutant is KILLED
when they fail, SURVIVED when they pass; a patch that no longer applies, tests that cannot be
collected or a run past its time are errors. First the named tests run on the unpatched copy:
they must pass, else a failure would prove nothing. The exit status is non-zero if any mutant
survived or anything errored.

A patch is a `git diff` of one mutation against the tree, with a header of `#` lines saying what
it breaks and which tests kill it (git apply skips text before the diff). Whoever moves the code
a patch touches re-targets the patch: make the same mutation in the new code, replace the diff.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
PYTHON = ROOT / ".venv" / "bin" / "python"
RUN_TIMEOUT_S = 900
"""A run of one mutant's tests longer than this is an error (a mutant that hangs the engine)."""


@dataclass
class Mutant:
    path: Path
    what: str
    tests: list[str]

    @property
    def name(self) -> str:
        return self.path.stem


def read_mutant(path: Path) -> Mutant:
    """The patch's header: `# Mutant: WHAT` and one `# test: NODE_ID` line per test."""
    what, tests = "", []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if text.startswith("Mutant:"):
            what = text.removeprefix("Mutant:").strip()
        elif text.startswith("test:"):
            tests.append(text.removeprefix("test:").strip())
    if not tests:
        raise SystemExit(
            f"{path}: no '# test: NODE_ID' line in its header; name the tests that kill it"
        )
    return Mutant(path, what, tests)


def copy_tree(into: Path) -> None:
    """The repository's tracked files, as the working tree has them, into `into`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        source = ROOT / rel
        if source.is_file():  # a tracked file deleted in the working tree is left out
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def pytest(where: Path, tests: list[str]) -> tuple[int, str]:
    """Exit status and last line of the tests run in `where` (124 when past RUN_TIMEOUT_S)."""
    cmd = [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)  # the copy's own tree first, nothing else's
    try:
        proc = subprocess.run(
            cmd, cwd=where, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired:
        return 124, f"past {RUN_TIMEOUT_S} s"
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    return proc.returncode, lines[-1] if lines else ""


def check_imports_from(where: Path) -> None:
    """The scratch copy's `rap` must be the one its tests import (not the editable install's)."""
    probe = [str(PYTHON), "-c", "import rap; print(rap.__file__)"]
    found = subprocess.run(probe, cwd=where, capture_output=True, text=True, check=True).stdout
    if not Path(found.strip()).is_relative_to(where):
        raise SystemExit(
            f"the tests in {where} import rap from {found.strip()}, not from the copy: mutants "
            "would be tested against the unpatched code; expected the copy's rap first on sys.path"
        )


def verdict(rc: int) -> str:
    """pytest's exit status: 1 tests failed (killed), 0 passed (survived), else an error."""
    return {0: "SURVIVED", 1: "KILLED"}.get(rc, "ERROR")


def run_mutant(mutant: Mutant, pristine: Path, each: bool) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix=f"rap-mutant-{mutant.name}-") as tmp:
        work = Path(tmp) / "repo"
        shutil.copytree(pristine, work, symlinks=True)
        applied = subprocess.run(
            ["git", "apply", str(mutant.path)], cwd=work, capture_output=True, text=True
        )
        if applied.returncode != 0:
            return "ERROR", f"the patch no longer applies: {applied.stderr.strip()}"
        if not each:
            rc, last = pytest(work, mutant.tests)
            return verdict(rc), last
        results = [(t, *pytest(work, [t])) for t in mutant.tests]
        kinds = {verdict(rc) for _, rc, _ in results}
        said = "; ".join(f"{t.split('::')[-1]}: {verdict(rc)}" for t, rc, _ in results)
        if kinds == {"KILLED"}:
            return "KILLED", said
        return ("SURVIVED" if "SURVIVED" in kinds else "ERROR"), said


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="run only mutants whose file name contains one")
    parser.add_argument("--each", action="store_true", help="every named test must kill it alone")
    args = parser.parse_args()
    patches = sorted(MUTANTS.glob("*.patch"))
    mutants = [
        read_mutant(p) for p in patches if not args.only or any(o in p.name for o in args.only)
    ]
    if not mutants:
        raise SystemExit(f"no mutant under {MUTANTS} matches {args.only}")
    started = time.monotonic()
    bad = 0
    with tempfile.TemporaryDirectory(prefix="rap-mutants-") as tmp:
        pristine = Path(tmp) / "repo"
        copy_tree(pristine)
        check_imports_from(pristine)
        named = sorted({t for m in mutants for t in m.tests})
        rc, last = pytest(pristine, named)
        print(f"baseline (no mutant, {len(named)} tests): {'ok' if rc == 0 else 'FAILED'}: {last}")
        if rc != 0:
            print("the named tests must pass on the unpatched tree before a mutant can be judged")
            return 1
        for m in mutants:
            t0 = time.monotonic()
            result, detail = run_mutant(m, pristine, args.each)
            bad += result != "KILLED"
            took_s = time.monotonic() - t0
            print(f"{result:8} {m.name} ({took_s:.0f} s): {m.what}\n         {detail}")
    total_s = time.monotonic() - started
    print(f"{len(mutants) - bad} of {len(mutants)} mutants killed in {total_s:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
