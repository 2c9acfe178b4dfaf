"""``lmgate simulate``: run the LM Studio simulator until SIGINT or SIGTERM.

    lmgate simulate [--host 127.0.0.1] [--port 1234] [--config FILE] [--control] [--speed N]

Prints one line saying where it listens. Exit codes: 0 after a signal, 2 for a bad config file or
an address it cannot listen on (a port in use: one line says so, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import anyio

from gateway.server.serving import ListenError
from gateway.simulator.clock import RealClock
from gateway.simulator.config import SimConfigError, SimulatorFile, load_file, models_of
from gateway.simulator.simulator import Simulator

EXIT_CONFIG = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1, as LM Studio)")
    parser.add_argument("--port", type=int, default=1234, help="listen port (default 1234, as LM Studio; 0: any free)")
    parser.add_argument("--config", metavar="FILE", help="YAML file with models and settings (see docs/simulator.md)")
    parser.add_argument("--control", action="store_true", help="enable the private /__sim/ control API")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="run simulated time N times faster than real time (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_file(args.config) if args.config else SimulatorFile()
        if not args.speed > 0:
            raise SimConfigError(f"--speed must be > 0, got {args.speed}")
    except SimConfigError as exc:
        print(f"lmgate simulate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not logging.getLogger().handlers:  # show LM Studio's log lines, as its server log would
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("hypercorn.error").setLevel(logging.WARNING)  # our own line says where we listen
    try:
        return anyio.run(_serve, args, config)
    except ListenError as exc:
        print(f"lmgate simulate: {exc}", file=sys.stderr)
        return EXIT_CONFIG


async def _serve(args: argparse.Namespace, config: SimulatorFile) -> int:
    simulator = Simulator(
        models=models_of(config),
        settings=config.settings,
        clock=RealClock(speed=args.speed),
        control=args.control or config.control,
        host=args.host,
        port=args.port,
        graceful_timeout_s=3.0,
    )
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with simulator:
            extra = " (control API at /__sim/)" if simulator.app.control is not None else ""
            print(f"LM Studio simulator listening on {simulator.url}{extra}", flush=True)
            async for _ in signals:
                break
    return 0
