"""docs/simulator.md stays true: its pytest example runs, and every public name is documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from gateway.simulator import FAULT_KINDS, Counters, SimModel, SimSettings

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "simulator.md").read_text()


@pytest.mark.slow  # a pytest run in a subprocess: a few seconds of start-up
def test_the_pytest_example_passes(tmp_path):
    example = re.search(r"```python\n(# test_my_app\.py.*?)```", DOC, re.S)
    assert example is not None
    (tmp_path / "test_my_app.py").write_text(example.group(1))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_every_field_fault_and_counter_is_documented():
    names = [f.name for f in fields(SimModel) if f.name not in {"publisher", "arch", "quantization", "format", "size_bytes"}]
    names += [f.name for f in fields(SimSettings)] + [f.name for f in fields(Counters)] + list(FAULT_KINDS)
    missing = [name for name in names if f"`{name}`" not in DOC]
    assert missing == []
