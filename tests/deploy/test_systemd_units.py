"""The systemd units in ``deploy/systemd/`` agree with lmgate: valid command lines, a stop timeout
longer than the drain, and (where ``systemd-analyze`` exists) a clean ``systemd-analyze verify``."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import _parser
from gateway.config.settings import Config
from gateway.server.connections import RESERVED_DESCRIPTORS

UNITS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = sorted(path.name for path in UNITS_DIR.glob("*.service"))
BINARY = "/opt/lmgate/current/bin/lmgate"
# After drain.timeout_s, lmgate takes about 4 s to end what is left (server.py _ABORT_FLUSH_S and
# hypercorn's graceful timeout); systemd must not SIGKILL before that.
AFTER_DRAIN_S = 5


def service(unit: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS_DIR / unit, encoding="utf-8")
    return parser["Service"]


def test_both_units_are_here():
    assert UNITS == ["lmgate.service", "lmgate@.service"]


@pytest.mark.parametrize("unit", UNITS)
def test_the_commands_are_lmgate_commands(unit):
    argv = shlex.split(service(unit)["ExecStart"].replace("%i", "8081"))
    assert argv[0] == BINARY
    args = _parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown flag
    assert args.command == "serve" and args.config == "/etc/lmgate/lmgate.yaml"
    serve = shlex.split(service(unit)["ExecStart"])
    assert ("--port" in serve) == unit.startswith("lmgate@")


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_waits_for_the_drain_before_killing(unit):
    settings = service(unit)
    assert settings.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert settings["RestartPreventExitStatus"] == "2"  # lmgate's exit status for a bad config
    timeout = settings["TimeoutStopSec"]
    assert timeout.isdigit(), "keep TimeoutStopSec in plain seconds"
    assert int(timeout) > Config().drain.timeout_s + AFTER_DRAIN_S


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_accepts_the_unit(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that the binary exists: point it at this Python instead of the install path.
    text = (UNITS_DIR / unit).read_text(encoding="utf-8").replace(BINARY, sys.executable)
    path = tmp_path / unit.replace("@.", "@8081.")
    path.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    # Unknown keys are only warnings (exit status 0): any output is a failure here.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_the_open_files_limit_leaves_room_for_many_client_connections(unit):
    # Without it lmgate got systemd's 1,024, and 1,100 idle connections locked it out.
    limit = service(unit)["LimitNOFILE"]
    assert limit.isdigit() and int(limit) >= 65536
    pool = Config().upstream_pool_connections()
    assert pool is not None
    assert int(limit) - pool - RESERVED_DESCRIPTORS >= 65000  # the default listen.max_connections
