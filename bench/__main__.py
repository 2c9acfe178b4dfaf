"""``python -m bench``: run the benchmark suite and print (or write) the markdown report.

    python -m bench --install-litellm --out bench/RESULTS.md     the full run quoted in the docs
    python -m bench --quick                                       a few seconds: does the suite work?

See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench._loop import loop_name
from bench.legs import DIAGNOSTIC_LEGS, LEG_NAMES, make_legs
from bench.procs import plan_placement, raise_nofile
from bench.report import render
from bench.suite import Run, run_suite, scenarios

DEFAULT_LITELLM = Path(os.environ.get("LMGATE_BENCH_LITELLM", Path.home() / ".cache" / "lmgate-bench" / "litellm"))
# 1.107.0 was reported compromised: never install it.
LITELLM_REQUIREMENT = "litellm[proxy]!=1.107.0"
INSTALL_LIMIT_S = 300


def install_litellm(venv: Path) -> str | None:
    """Make LiteLLM's virtual environment once (at most ~5 minutes); the reason it failed, or None."""
    if (venv / "bin" / "litellm").exists():
        return None
    print(f"installing {LITELLM_REQUIREMENT} into {venv} (at most {INSTALL_LIMIT_S} s) ...", file=sys.stderr)
    started = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=60)
        left = max(10.0, INSTALL_LIMIT_S - (time.monotonic() - started))
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT],
                       check=True, capture_output=True, timeout=left)
    except subprocess.TimeoutExpired:
        return f"installing {LITELLM_REQUIREMENT} took more than {INSTALL_LIMIT_S} s; skipped"
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        return f"installing {LITELLM_REQUIREMENT} failed: {tail[0]}"
    return None


def versions(legs_versions: dict[str, str]) -> dict[str, str]:
    out = dict(legs_versions)
    libs = []
    for package in ("hypercorn", "h11", "httpx", "httpcore", "anyio"):
        try:
            libs.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    out["lmgate's stack"] = ", ".join(libs)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="lmgate's benchmark suite (issues 9 and 17).")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a few seconds, only checks the suite works")
    parser.add_argument("--legs", default=",".join(LEG_NAMES), help=f"comma-separated, from {', '.join(LEG_NAMES)}; diagnostics: {', '.join(DIAGNOSTIC_LEGS)}")
    parser.add_argument("--scenarios", help="comma-separated subset of scenario names")
    parser.add_argument("--out", type=Path, help="write the markdown report here (it is always printed)")
    parser.add_argument("--json", type=Path, help="write every round's raw figures here")
    parser.add_argument("--litellm-venv", type=Path, default=DEFAULT_LITELLM,
                        help="LiteLLM's virtual environment (env LMGATE_BENCH_LITELLM)")
    parser.add_argument("--install-litellm", action="store_true",
                        help=f"create --litellm-venv with pip install '{LITELLM_REQUIREMENT}' if missing (<= 5 min)")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                        help="event loop of the mock and generator (auto: uvloop when installed)")
    parser.add_argument("--alt-python", default=sys.executable,
                        help="interpreter with uvicorn/uvloop for the diagnostic legs (relay-*, lmgate-uvicorn...)")
    parser.add_argument("--work-dir", type=Path, help="keep configs and proxy logs here (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench" + (" " + shlex.join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    rounds = args.rounds or (1 if args.quick else 3)
    names = [n.strip() for n in args.legs.split(",") if n.strip()]
    install_problem = install_litellm(args.litellm_venv) if args.install_litellm and "litellm" in names else None
    legs, skipped = make_legs(names, litellm_venv=args.litellm_venv, alt_python=args.alt_python)
    if install_problem:
        skipped["litellm"] = install_problem
    chosen = scenarios(args.quick)
    if args.scenarios:
        wanted = {s.strip() for s in args.scenarios.split(",")}
        chosen = [s for s in chosen if s.name in wanted]
    raise_nofile()
    run = Run(
        placement=plan_placement(),
        rounds=rounds,
        legs=[leg.name for leg in legs],
        skipped=skipped,
        versions=versions({leg.name: leg.version for leg in legs if leg.name != "direct"}),
        scenarios=chosen,
        harness_loop=loop_name(args.loop),
        quick=args.quick,
    )
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"{run.placement.note}; harness loop {run.harness_loop}; legs {', '.join(run.legs)}"
        + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    run_suite(legs, run, work=args.work_dir, log=log)
    report = render(run, command=command)
    print(report)
    if args.out:
        args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"scenarios": {s.name: s.args for s in run.scenarios},
                                         "results": run.results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
