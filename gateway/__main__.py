"""``python -m gateway``: same as ``lmgate`` (``serve`` when no subcommand is given)."""

import sys

from gateway.cli import module_main

sys.exit(module_main())
