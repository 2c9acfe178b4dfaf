"""``lmgate doctor``: its arguments and exit codes (0 fine, 1 escalate, 2 usage or configuration)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import anyio

from gateway.config import ConfigError, load_config
from gateway.doctor.core import DoctorOptions, diagnose
from gateway.doctor.render import ProgressBar, render_text

EXIT_OK, EXIT_ESCALATE, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the server to check: LM Studio, lmgate or the simulator "
                                      "(default: lmgate's address from --config, else http://127.0.0.1:1234)")
    parser.add_argument("-n", "--requests", type=int, default=10, help="generations to run (default 10)")
    parser.add_argument("--concurrency", type=int, default=2, help="generations at a time (default 2)")
    parser.add_argument("--model", help="model to generate with (default: the first loaded one)")
    parser.add_argument("--cold", metavar="MODEL", help="unload MODEL, then time its cold start")
    parser.add_argument("--heartbeat-s", type=float, help="silence a stream must survive "
                                                          "(default: models.heartbeat_s from --config, else 10)")
    parser.add_argument("--timeout-s", type=float, default=90.0, help="per request (default 90, the seed's advice)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per generation (default 32)")
    parser.add_argument("--api-key-env", default="LMSTUDIO_API_KEY", metavar="NAME",
                        help="environment variable holding the key to send (default LMSTUDIO_API_KEY)")
    parser.add_argument("--config", metavar="FILE", help="lmgate's config file, for its address and heartbeat")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def options_from(args: argparse.Namespace) -> DoctorOptions:
    """Validated options; raises ``ValueError`` (or ``ConfigError``) naming what is wrong."""
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        raise ValueError("-n, --concurrency and --max-tokens must be at least 1")
    if args.timeout_s <= 0 or (args.heartbeat_s is not None and args.heartbeat_s <= 0):
        raise ValueError("--timeout-s and --heartbeat-s must be above 0")
    url, heartbeat_s = args.url, args.heartbeat_s
    if args.config is not None:
        config = load_config(args.config)
        host = config.listen.host if config.listen.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        url = url or f"http://{'[' + host + ']' if ':' in host else host}:{config.listen.port}"
        heartbeat_s = heartbeat_s if heartbeat_s is not None else config.models.heartbeat_s
    elif heartbeat_s is None:
        heartbeat_s = 10.0
    url = url or "http://127.0.0.1:1234"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    return DoctorOptions(
        url=url, requests=args.requests, concurrency=args.concurrency, model=args.model, cold=args.cold,
        heartbeat_s=heartbeat_s, timeout_s=args.timeout_s, max_tokens=args.max_tokens,
        api_key=os.environ.get(args.api_key_env) or None,
    )


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from(args)
    except (ValueError, ConfigError) as exc:
        print(f"lmgate doctor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.json else None
    report = anyio.run(lambda: diagnose(options, progress=progress))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        sys.stdout.write(render_text(report))
    return EXIT_ESCALATE if report.escalate else EXIT_OK
