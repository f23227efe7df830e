"""The shared loop of the mutation checks (tests/mutate_*.py): alter one term at a time in a source file, run
the tests that must catch it, restore the file. Not collected by pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mutations(src: Path, mutations: dict[str, tuple[str, str]], pytest_args: list[str]) -> int:
    """Each (name: (text, replacement)) applied alone to `src` (the text must occur exactly once), then
    `pytest -x -q *pytest_args`; prints caught / MISSED per mutation. Returns 1 if any was missed, else 0."""
    orig = src.read_text()
    width = max(map(len, mutations)) + 2
    missed = []
    try:
        for name, (a, b) in mutations.items():
            assert orig.count(a) == 1, f"mutation target not found once in {src}: {a}"
            src.write_text(orig.replace(a, b))
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                "-p", "no:warnings", *pytest_args], cwd=ROOT, capture_output=True, check=False)
            caught = r.returncode != 0
            print(f"{name:{width}s} {'caught' if caught else 'MISSED'}", flush=True)
            if not caught:
                missed.append(name)
    finally:
        src.write_text(orig)
    return 1 if missed else 0
