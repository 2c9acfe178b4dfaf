"""The benchmark suite still runs end to end (a few seconds, tiny sizes; no timing is asserted).

``python -m bench --quick`` starts the mock, each leg that can run here (``relay``, the lmgate legs,
NGINX only when installed; LiteLLM never: it lives in its own virtual environment and takes long to
start), runs every scenario once and renders the report. A benchmark is never a timed test: the figures of a smoke
run mean nothing and are not checked, only that every leg produced them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("latency_c1", "throughput_c64", "stream_c1", "stream_c64", "long_256", "long_1000", "long_100", "cancel_500")
FATES = ("streams_complete", "streams_refused", "streams_error_frame", "streams_truncated")


@pytest.mark.slow
def test_quick_run_measures_every_leg_and_scenario(tmp_path: Path) -> None:
    legs = ["direct", "relay", "lmgate", "lmgate-all"] + (["nginx"] if shutil.which("nginx") else [])
    raw = tmp_path / "raw.json"
    report = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--legs", ",".join(legs), "--loop", "asyncio",
         "--json", str(raw), "--out", str(report), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(raw.read_text())["results"]
    assert set(results) == set(SCENARIOS)
    for scenario, by_leg in results.items():
        assert set(by_leg) == set(legs), scenario
        for leg, rounds in by_leg.items():
            assert len(rounds) == 1, (scenario, leg)
    for leg in legs:
        requests = results["throughput_c64"][leg][0]
        assert requests["completed"] > 0 and not requests["errors"], (leg, requests)
        for scenario in ("long_256", "long_1000", "long_100"):
            long = results[scenario][leg][0]
            assert long["complete_streams"] == long["streams"] and long["lost_frames"] == 0, (scenario, leg, long)
            assert sum(long[key] for key in FATES) == long["streams"], (scenario, leg, long)
        assert sum(results["stream_c64"][leg][0][key] for key in FATES) > 0, leg
    # Every stream is classified; at these sizes, straight to the mock or through lmgate, every one is complete.
    for leg in ("direct", "lmgate"):
        for scenario in ("long_256", "long_1000", "stream_c64"):
            figures = results[scenario][leg][0]
            assert figures["streams_complete"] > 0 and figures["streams_truncated"] == 0, (scenario, leg, figures)
            assert figures["streams_refused"] == figures["streams_error_frame"] == 0, (scenario, leg, figures)
    assert results["long_256"]["lmgate"][0]["proxy_cpu_us_per_chunk"] > 0
    assert results["long_256"]["relay"][0]["proxy_cpu_us_per_chunk"] > 0
    # lmgate and NGINX pass every cancel on and leave no upstream stream running (the bare relay has
    # no disconnect watcher: it reads its upstream to the end, which the storm shows).
    for leg in [leg for leg in legs if leg not in ("direct", "relay")]:
        storm = results["cancel_500"][leg][0]
        assert storm["cancels_missing"] == 0 and storm["left_over_streams"] == 0, (leg, storm)
    text = report.read_text()
    assert "## Targets (issue 17" in text and "### Cancel storm" in text and "### 256 concurrent long streams" in text
    assert "Layers nearly free" in text and "needs the relay leg" not in text
