"""The ``lmgate`` command as a user meets it, in real processes: ``keys hash``, an address already
in use, a reader that leaves early (``| head``), and the one start-up line of ``serve --simulate``."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import anyio
import httpx
import pytest

from middleware.auth import hash_key, normalise_digest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def lmgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


# --- lmgate keys hash ------------------------------------------------------------------------------


@pytest.mark.parametrize("typed", ["sk-team-a-3f9c\n", "  sk-team-a-3f9c \r\n"])
def test_keys_hash_reads_the_key_from_stdin_and_prints_its_digest(typed: str) -> None:
    result = subprocess.run(lmgate("keys", "hash"), input=typed, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hash_key("sk-team-a-3f9c") + "\n"
    assert normalise_digest(result.stdout) == normalise_digest(hash_key("sk-team-a-3f9c"))  # auth.keys takes it
    assert "sk-team-a" not in result.stderr


@pytest.mark.parametrize(
    ("args", "typed", "message"),
    [
        ([], "", "the key is empty"),
        ([], " \n\n", "the key is empty"),
        ([], "two\nlines\n", "one line of printable ASCII"),
        (["sk-in-history"], "", "do not pass the key as an argument"),
    ],
)
def test_keys_hash_refuses_an_empty_key_and_a_key_on_the_command_line(
    args: list[str], typed: str, message: str
) -> None:
    result = subprocess.run(lmgate("keys", "hash", *args), input=typed, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and len(result.stderr.splitlines()) == 1


def test_keys_hash_prompts_on_a_terminal_without_echoing_the_key() -> None:
    controller, terminal = pty.openpty()
    try:
        # A new session has no controlling terminal, so getpass reads the pty on stdin (with echo off).
        process = subprocess.Popen(
            lmgate("keys", "hash"), stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, env=ENV,
        )  # fmt: skip
        os.close(terminal)
        assert process.stderr is not None
        # Type only once the prompt is there: getpass discards what was typed before it.
        prompt = b""
        while b"Key to hash" not in prompt:
            ready, _, _ = select.select([process.stderr], [], [], 30)
            assert ready, f"no prompt: {prompt!r}"
            chunk = os.read(process.stderr.fileno(), 1024)
            assert chunk, f"exited before the prompt: {prompt!r}"
            prompt += chunk
        os.write(controller, b"sk-typed-key\n")
        out, err = process.communicate(timeout=30)
    finally:
        os.close(controller)
    assert process.returncode == 0, err
    assert out.decode() == hash_key("sk-typed-key") + "\n"
    assert b"sk-typed-key" not in prompt + err


# --- an address lmgate cannot have ------------------------------------------------------------------


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize(
    ("command", "prefix"),
    [
        (lmgate("serve"), "lmgate"),
        (lmgate("serve", "--simulate"), "lmgate"),
        (lmgate("simulate"), "lmgate simulate"),
        ([sys.executable, "-m", "gateway.simulator"], "lmgate simulate"),
    ],
)
def test_a_port_in_use_is_one_line_and_exit_2(command: list[str], prefix: str, occupied_port: int) -> None:
    result = subprocess.run([*command, "--port", str(occupied_port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"{prefix}: cannot listen on 127.0.0.1:{occupied_port}: address already in use; "
        "stop the other process or pass --port"
    ]


def test_an_address_this_machine_does_not_have_is_one_line_and_exit_2() -> None:
    # 192.0.2.0/24 is reserved for documentation: no machine has it.
    result = subprocess.run(lmgate("serve", "--host", "192.0.2.1"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "lmgate: cannot listen on 192.0.2.1:8080: this machine has no such address; "
        "pass --host with one of its addresses (127.0.0.1 by default)"
    ]


# --- a reader that leaves early ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [["config", "schema"], ["config", "example"]])
def test_a_closed_stdout_ends_quietly_like_other_unix_tools(command: list[str]) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # `| head` that has already left: every write fails with EPIPE
    try:
        result = subprocess.run(lmgate(*command), stdout=writer, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(writer)
    assert result.stderr == ""
    assert result.returncode == 128 + signal.SIGPIPE


# --- lmgate serve --simulate ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_serve_simulate_prints_one_line_saying_where_lmgate_listens_and_what_it_forwards_to(
    lmgate_loop: str,
) -> None:
    env = {**ENV, "LMGATE_LISTEN__EVENT_LOOP": lmgate_loop}
    process = await anyio.open_process(lmgate("serve", "--simulate", "--port", "0"), env=env)
    assert process.stdout is not None and process.stderr is not None
    stdout = b""
    try:
        with anyio.fail_after(30):
            first_line = b""
            async for chunk in process.stderr:
                first_line += chunk
                if b"\n" in first_line:
                    break
            process.send_signal(signal.SIGTERM)
            stdout = b"".join([chunk async for chunk in process.stdout])
            rest = b"".join([chunk async for chunk in process.stderr])
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()
    lines = (first_line + rest).decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lmgate listening on http://127.0.0.1:")
    assert ", forwarding to the built-in LM Studio simulator at http://127.0.0.1:" in lines[0]
    assert b"Running on" not in stdout  # hypercorn's own lines, one of them the simulator's port


@pytest.mark.anyio
async def test_serve_keeps_serving_quietly_when_its_log_reader_leaves() -> None:
    # `lmgate serve | head`: once the reader of stdout has gone, every log line used to print a
    # "--- Logging error ---" traceback on stderr. The logs are dropped instead, with one line saying so.
    reader, writer = os.pipe()
    process = await anyio.open_process(lmgate("serve", "--simulate", "--port", "0"), env=ENV, stdout=writer)
    os.close(writer)
    os.close(reader)  # the reader left before the first log line
    assert process.stderr is not None
    stderr = b""
    try:
        with anyio.fail_after(30):
            async for chunk in process.stderr:
                stderr += chunk
                if b"lmgate listening on " in stderr and stderr.endswith(b"\n"):
                    break
            listening = next(line for line in stderr.decode().splitlines() if line.startswith("lmgate listening on "))
            url = listening.split()[3].rstrip(",")
            async with httpx.AsyncClient(trust_env=False) as client:
                for _ in range(3):
                    assert (await client.get(url + "/v1/models")).status_code == 200
            process.send_signal(signal.SIGTERM)
            stderr += b"".join([chunk async for chunk in process.stderr])
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()
    text = stderr.decode()
    assert "Logging error" not in text and "Traceback" not in text, text
    assert text.count("logs are dropped") == 1, text
