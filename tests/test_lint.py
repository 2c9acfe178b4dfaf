"""``mypy`` (strict, over gateway/ and middleware/) and ``ruff check .`` pass on the repository.

Both read their settings from pyproject.toml ([tool.mypy], [tool.ruff]), so these tests run
exactly what a developer runs by hand in the repository root. Without mypy or ruff installed
(they come with the ``test`` extra) the tests skip, unless ``LMGATE_REQUIRE_LINT`` is set, as
.ci/run does, where a missing linter fails them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        reason = f"{module} is not installed (pip install -e '.[test]' -c constraints.txt)"
        if os.environ.get("LMGATE_REQUIRE_LINT") == "1":
            pytest.fail(reason + "; LMGATE_REQUIRE_LINT=1, so it is required", pytrace=False)
        pytest.skip(reason)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow  # a first run, without mypy's cache, type-checks every module and what they import
def test_mypy_strict_passes() -> None:
    result = run_tool("mypy")
    assert result.returncode == 0, f"`python -m mypy` in {ROOT.name}/ failed:\n{result.stdout}{result.stderr}"


def test_ruff_check_passes() -> None:
    result = run_tool("ruff", "check", ".")
    assert result.returncode == 0, f"`python -m ruff check .` in {ROOT.name}/ failed:\n{result.stdout}{result.stderr}"
