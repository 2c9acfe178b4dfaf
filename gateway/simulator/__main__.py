"""``python -m gateway.simulator``: the same as ``lmgate simulate``."""

from __future__ import annotations

import argparse
import sys

from gateway.simulator.cli import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.simulator", description="Run the LM Studio simulator.")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
