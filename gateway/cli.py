"""The ``lmgate`` command.

    lmgate serve [--config FILE] [--host H] [--port P] [--upstream URL] [--simulate]
    lmgate simulate [--host 127.0.0.1] [--port 1234] [--config FILE]
    lmgate config check FILE      validate and print the effective config, secrets redacted
    lmgate config schema          the JSON schema of the config file (for editors)
    lmgate config example         every key with its default and a comment (lmgate.example.yaml)
    lmgate doctor [--url URL] [-n 10] [--concurrency 2] [--model M] [--cold MODEL] [--heartbeat-s S] [--json]
                                  check a server (LM Studio, lmgate) and advise; exit 1 when it should be escalated

Exit codes: 0 success, 1 (doctor) an escalation threshold was crossed, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import anyio

from gateway import __version__
from gateway.config import Config, ConfigError, load_config

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgate", description="A dependable gateway in front of LM Studio.")
    parser.add_argument("--version", action="version", version=f"lmgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    serve.add_argument("--upstream", metavar="URL", help="upstream base URL (overrides upstream.url)")
    serve.add_argument(
        "--simulate", action="store_true", help="also start the LM Studio simulator in-process and forward to it"
    )

    simulate = commands.add_parser("simulate", help="run the LM Studio simulator")
    from gateway.simulator.cli import add_arguments

    add_arguments(simulate)

    doctor = commands.add_parser("doctor", help="check LM Studio (or lmgate) and advise, like the seed's checklist")
    from gateway.doctor.cli import add_arguments as add_doctor_arguments

    add_doctor_arguments(doctor)

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate FILE and print the effective config")
    check.add_argument("file", metavar="FILE")
    config_commands.add_parser("schema", help="print the JSON schema")
    config_commands.add_parser("example", help="print an example file with every key and its default")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "doctor":
            from gateway.doctor.cli import run as run_doctor

            return run_doctor(args)
        if args.command == "simulate":
            from gateway.simulator.cli import run

            return run(args)
        return _config(args)
    except ConfigError as exc:
        print(f"lmgate: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _serve(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging
    from gateway.server import serve

    config = load_config(
        args.config,
        overrides={
            ("listen", "host"): args.host,
            ("listen", "port"): args.port,
            ("upstream", "url"): args.upstream,
        },
    )
    configure_logging(
        level=config.logging.level,
        fmt=config.logging.format,
        pipeline_version=config.logging.pipeline_version,
        config_hash=config.digest(),
    )

    def announce(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return anyio.run(lambda: serve(config, simulate=args.simulate, announce=announce))


def _config(args: argparse.Namespace) -> int:
    if args.config_command == "check":
        config = load_config(args.file)
        print(json.dumps(config.redacted(), indent=2))
        print(f"{args.file}: valid (config hash {config.digest()})", file=sys.stderr)
    elif args.config_command == "schema":
        print(json.dumps(Config.model_json_schema(), indent=2))
    else:
        from gateway.config_reference import example_yaml

        sys.stdout.write(example_yaml())
    return 0


def module_main() -> int:
    """``python -m gateway``: the same command; with no subcommand it serves."""
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]
    return main(argv)
