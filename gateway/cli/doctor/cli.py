"""``lmgate doctor``: its arguments and exit codes (0 fine, 1 escalate, 2 usage or configuration)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import anyio

from gateway.cli.doctor.core import DoctorOptions, diagnose
from gateway.cli.doctor.render import ProgressBar, render_text
from gateway.cli.doctor.target import default_target, given_target
from gateway.config.settings import Config, ConfigError, load_config

EXIT_OK, EXIT_ESCALATE, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the server to check: LM Studio, lmgate or the simulator (default: lmgate's "
                                      "address from --config, else lmgate on http://127.0.0.1:8080 if it answers, "
                                      "else LM Studio on http://127.0.0.1:1234)")
    parser.add_argument("-n", "--requests", type=int, default=10, help="generations to run (default 10)")
    parser.add_argument("--concurrency", type=int, default=2, help="generations at a time (default 2)")
    parser.add_argument("--model", help="model to generate with (default: the first loaded one)")
    parser.add_argument("--cold", metavar="MODEL", help="unload MODEL, then time its cold start")
    parser.add_argument("--heartbeat-s", type=float, help="silence a stream must survive "
                                                          "(default: models.heartbeat_s from --config, else 10)")
    parser.add_argument("--timeout-s", type=float, default=90.0, help="seconds per request (default 90)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per generation (default 32)")
    parser.add_argument("--api-key-env", default="LMSTUDIO_API_KEY", metavar="NAME",
                        help="environment variable holding the key to send (default LMSTUDIO_API_KEY)")
    parser.add_argument("--config", metavar="FILE", help="lmgate's config file, for its address and heartbeat "
                                                         "(and, when it names several upstreams, to check each one)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def options_from(args: argparse.Namespace, config: Config | None, url: str) -> DoctorOptions:
    """Validated options for checking ``url``; raises ``ValueError`` naming what is wrong."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    heartbeat_s = args.heartbeat_s
    if heartbeat_s is None:
        heartbeat_s = config.models.heartbeat_s if config is not None else 10.0
    return DoctorOptions(
        url=url, requests=args.requests, concurrency=args.concurrency, model=args.model, cold=args.cold,
        heartbeat_s=heartbeat_s, timeout_s=args.timeout_s, max_tokens=args.max_tokens,
        api_key=os.environ.get(args.api_key_env) or None, upstreams=config_upstreams(config),
    )


def config_upstreams(config: Config | None) -> tuple[tuple[str, str, str | None], ...]:
    """The upstreams of a config naming several, to check each one directly (with its own key)."""
    upstreams = config.upstream_list() if config is not None else ()
    if len(upstreams) < 2:
        return ()  # one: lmgate's own check covers it
    return tuple((u.name, u.url, u.resolved_api_key(os.environ)) for u in upstreams)


def check_numbers(args: argparse.Namespace) -> None:
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        raise ValueError("-n, --concurrency and --max-tokens must be at least 1")
    if args.timeout_s <= 0 or (args.heartbeat_s is not None and args.heartbeat_s <= 0):
        raise ValueError("--timeout-s and --heartbeat-s must be above 0")


def run(args: argparse.Namespace) -> int:
    try:
        check_numbers(args)
        config = load_config(args.config) if args.config is not None else None
        target = given_target(args.url, args.config, config) or anyio.run(default_target)
        options = options_from(args, config, target.url)
    except (ValueError, ConfigError) as exc:
        print(f"lmgate doctor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(target.describe(), file=sys.stderr, flush=True)
    progress = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.json else None
    report = anyio.run(lambda: diagnose(options, progress=progress))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        sys.stdout.write(render_text(report))
    return EXIT_ESCALATE if report.escalate else EXIT_OK
