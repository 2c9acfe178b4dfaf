"""The ``lmgate`` command.

    lmgate serve [--config FILE] [--host H] [--port P] [--upstream URL] [--simulate]
    lmgate simulate [--host 127.0.0.1] [--port 1234] [--config FILE]
    lmgate config check FILE      validate and print the effective config, secrets redacted
    lmgate config schema          the JSON schema of the config file (for editors)
    lmgate config example         every key with its default and a comment (lmgate.example.yaml)
    lmgate doctor [--url URL] [-n 10] [--concurrency 2] [--model M] [--cold MODEL] [--heartbeat-s S] [--json]
                                  check a server (LM Studio, lmgate) and advise; exit 1 when it should be escalated
    lmgate keys hash              read a client key (stdin, or a prompt) and print its digest for auth.keys

Exit codes: 0 success, 1 (doctor) an escalation threshold was crossed, 2 invalid configuration or
usage (an address lmgate cannot listen on, too), 141 stdout closed early (``lmgate config schema | head``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio

from gateway import __version__
from gateway.config.settings import Config, ConfigError, load_config
from gateway.server.serving import ListenError

EXIT_USAGE = 2  # invalid configuration or usage
# What a shell reports for a process killed by SIGPIPE, as `head` leaves most Unix tools.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


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

    doctor = commands.add_parser(
        "doctor", help="check LM Studio (or lmgate): streams, disconnects, cold loads; advise when to escalate"
    )
    from gateway.cli.doctor.cli import add_arguments as add_doctor_arguments

    add_doctor_arguments(doctor)

    keys = commands.add_parser("keys", help="client keys for auth.keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    hash_ = keys_commands.add_parser(
        "hash", help="print the digest of a key read from stdin (or typed at a prompt): sha256:<hex>"
    )
    # Accepted only to refuse it with a reason: a key on the command line stays in shell history.
    hash_.add_argument("key", nargs="?", help=argparse.SUPPRESS)

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate FILE and print the effective config")
    check.add_argument("file", metavar="FILE")
    config_commands.add_parser("schema", help="print the JSON schema")
    config_commands.add_parser("example", help="print an example file with every key and its default")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(_parser().parse_args(argv))
        finally:
            sys.stdout.flush()  # a reader that left shows here, not at interpreter exit
    except BrokenPipeError:
        # As the Python docs advise for SIGPIPE: point stdout at devnull so that the flush at
        # exit does not raise again, and end quietly, as `head` leaves other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "doctor":
            from gateway.cli.doctor.cli import run as run_doctor

            return run_doctor(args)
        if args.command == "simulate":
            from gateway.simulator.cli import run

            return run(args)
        if args.command == "keys":
            return _keys_hash(args)
        return _config(args)
    except (ConfigError, ListenError) as exc:
        print(f"lmgate: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    from gateway.server.run import event_loop_options, serve
    from gateway.telemetry.logs import configure_logging

    config = load_config(
        args.config,
        overrides={
            ("listen", "host"): args.host,
            ("listen", "port"): args.port,
            ("upstream", "url"): args.upstream,
        },
    )
    loop = event_loop_options(config.listen.event_loop)  # a uvloop that cannot be had fails here, exit 2
    configure_logging(
        level=config.logging.level,
        fmt=config.logging.format,
        pipeline_version=config.logging.pipeline_version,
        config_hash=config.digest(),
    )

    # serve() prints the one line a user needs (where lmgate listens, what it forwards to);
    # hypercorn's "Running on" lines would repeat it and, with --simulate, add the simulator's port.
    logging.getLogger("hypercorn.error").addFilter(lambda record: not record.getMessage().startswith("Running on "))

    def announce(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return anyio.run(lambda: serve(config, simulate=args.simulate, announce=announce), backend_options=loop)


def _config(args: argparse.Namespace) -> int:
    if args.config_command == "check":
        config = load_config(args.file)
        print(json.dumps(config.redacted(), indent=2))
        print(f"{args.file}: valid (config hash {config.digest()})", file=sys.stderr)
    elif args.config_command == "schema":
        print(json.dumps(Config.model_json_schema(), indent=2))
    else:
        from gateway.config.reference import example_yaml

        sys.stdout.write(example_yaml())
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    """Print ``sha256:<hex>`` of a key read from stdin, or typed at a prompt on a terminal."""
    from middleware.auth import hash_key

    if args.key is not None:
        return _refuse_key("do not pass the key as an argument (it stays in your shell history); "
                           "pipe it in, or run `lmgate keys hash` and type it at the prompt")
    try:
        if sys.stdin.isatty():
            import getpass

            key = getpass.getpass("Key to hash (not shown): ")
        else:
            key = sys.stdin.read()
    except EOFError:  # Ctrl+D at the prompt
        key = ""
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 128 + signal.SIGINT
    # HTTP strips the spaces around a header value, so a key with them could never match.
    key = key.strip()
    if not key:
        return _refuse_key("the key is empty; pipe a key in (e.g. from a file) or type one at the prompt")
    if not key.isascii() or not key.isprintable():
        return _refuse_key("a key must be one line of printable ASCII, as HTTP headers carry it")
    print(hash_key(key))
    return 0


def _refuse_key(reason: str) -> int:
    print(f"lmgate keys hash: {reason}", file=sys.stderr)
    return EXIT_USAGE


def module_main() -> int:
    """``python -m gateway``: the same command; with no subcommand it serves."""
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]
    return main(argv)
