"""Guards on the repository itself: what CI and a fresh clone must never carry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_TRACKED_BYTES = 2 * 1024 * 1024


def tracked_files() -> list[Path]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listing.decode().split("\0") if name]


def test_no_tracked_file_is_large():
    # A stray temp file once reached 32 GB; submissions have hard size limits.
    large = [(p.relative_to(ROOT), p.stat().st_size) for p in tracked_files() if p.is_file() and p.stat().st_size > MAX_TRACKED_BYTES]
    assert large == []


def test_no_machine_paths_in_tracked_text():
    # Spelled in pieces so that this file does not match itself.
    needles = tuple("/" + part + "/" for part in ("work", "root", "home")) + ("/tmp" + "/pytest",)
    offenders = []
    for path in tracked_files():
        if not path.is_file() or path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".conf", ".service", ""}:
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in needles if n in text]
    assert offenders == []


def test_constraints_pin_every_declared_dependency_within_its_bounds():
    # README's test command installs with -c constraints.txt: a dependency missing from it would
    # float to whatever was released last night, and a pin outside pyproject's bounds would fail.
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    problems = []
    for requirement in declared:
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{requirement.name} is not pinned")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{requirement.name}=={pinned} is outside {requirement.specifier}")
    assert problems == [], "run .ci/refresh-constraints"


def test_a_skip_says_why_in_words_a_user_can_act_on(tmp_path):
    # Without Chromium the browser test once skipped with "unhandled errors in a TaskGroup": its
    # skip was raised inside the test's servers. Run it with a PATH that has no browser.
    env = {k: v for k, v in os.environ.items() if k != "LMGATE_REQUIRE_CHROMIUM"}
    env["PATH"] = str(tmp_path)  # empty: the interpreter is named by its full path
    test = "tests/gateway/test_status_page.py::test_page_shows_a_model_going_from_loading_to_loaded_without_console_errors"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", test, "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "TaskGroup" not in result.stdout
    assert "Chromium not found on PATH" in result.stdout and "LMGATE_REQUIRE_CHROMIUM=1" in result.stdout
