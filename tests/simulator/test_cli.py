"""``lmgate simulate``: serves until SIGINT, says where; a bad config exits 2 naming the problem."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from gateway.simulator.cli import add_arguments, run

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_lm_studios():
    args = parse()
    assert (args.host, args.port, args.config, args.control, args.speed) == ("127.0.0.1", 1234, None, False, 1.0)


def test_a_bad_config_exits_2_and_names_the_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("settings:\n  jit: sometimes\n")
    assert run(parse("--config", str(path))) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "settings.jit" in err


def test_a_bad_speed_exits_2(capsys):
    assert run(parse("--speed", "0")) == 2
    assert "--speed" in capsys.readouterr().err


@pytest.mark.anyio
async def test_it_serves_until_sigint(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("models:\n  - id: tiny\n    loaded: true\n    ttft_base_s: 0\n    tokens_per_second: 1000\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "gateway.simulator", "--port", "0", "--config", str(config), "--control"]
    async with await anyio.open_process(command, env=env, cwd=ROOT) as process:
        assert process.stdout is not None
        with anyio.fail_after(20):
            line = b""
            async for chunk in process.stdout:
                line += chunk
                if b"\n" in line:
                    break
        announced = line.decode().strip()
        assert announced.startswith("LM Studio simulator listening on http://127.0.0.1:")
        assert announced.endswith("(control API at /__sim/)")
        url = announced.split(" on ")[1].split(" ")[0]
        async with httpx.AsyncClient(trust_env=False) as client:
            models = (await client.get(url + "/v1/models")).json()
            answer = await client.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert answer.status_code == 200
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            assert await process.wait() == 0
