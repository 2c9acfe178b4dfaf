"""``lmgate doctor``: the troubleshooting guide's "Verifying Fixes" procedure as one command.

Against a running LM Studio (or lmgate, or the simulator) it checks that the server answers and
which API generations it speaks, lists the models with their state and context length, times a
cold load if asked, runs N streamed generations at a concurrency, judges the streams' silences
against the heartbeat length, and ends with advice drawn from the guide's "When to Escalate"
thresholds. The exit code is 1 when one is crossed. See docs/doctor.md.

* ``core``: ``diagnose(options) -> Report``, the async procedure;
* ``probe``: the server, its APIs and models; ``measure``: one streamed generation, and a batch;
* ``advice``: thresholds and advice; ``report``: the result as data; ``render``: as text;
* ``target``: which server to check when none is named; ``cli``: the arguments and exit codes.
"""

from gateway.cli.doctor.core import DoctorOptions, diagnose
from gateway.cli.doctor.report import Report

__all__ = ["DoctorOptions", "Report", "diagnose"]
