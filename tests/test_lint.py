"""ruff over the code (asr/, tools/, tests/, recipes/) with the rules of pyproject.toml's
[tool.ruff.lint]: any finding fails the suite. ruff comes with the dev extra; without it the test
is skipped, saying so."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401  (the wheel ships the binary; `python -m ruff` runs it)
    except ImportError:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return [sys.executable, "-m", "ruff"]


def test_ruff_finds_nothing():
    done = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise",
                           "asr", "tools", "tests", "recipes"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ruff findings (fix them, `ruff check --fix` sorts imports):\n{done.stdout}{done.stderr}"
