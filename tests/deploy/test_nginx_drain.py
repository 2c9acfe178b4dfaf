"""Rolling restarts behind NGINX: draining one of two lmgate replicas loses no request.

Two real ``python -m gateway serve`` processes sit behind ``deploy/nginx/replicas.conf``. Streams
are in flight on both when replica A gets SIGTERM. A's streams must finish; every new request
must succeed, moved by NGINX to replica B (A refuses with 503 ``draining``, which the sample's
``proxy_next_upstream ... http_503 non_idempotent`` resends); and requests keep succeeding after
A has exited. A scripted upstream holds the streams open until the test lets them finish, so
nothing depends on timing.
"""

from __future__ import annotations

import signal
import time

import anyio
import httpx
import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SSE_HEADERS = [(b"content-type", b"text/event-stream")]
CHAT = "/v1/chat/completions"
IN_FLIGHT = 4
NEW_REQUESTS = 6


def frame(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % text.encode()


ANSWER = frame("first") + frame("second") + b"data: [DONE]\n\n"


async def poll_until(check, *, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Bounded poll of another process's state (its readiness), not of the test's own logic."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await anyio.sleep(0.02)


async def test_draining_one_of_two_replicas_loses_no_request(script, lmgate_process, nginx):
    finish = anyio.Event()
    held = 0
    all_held = anyio.Event()

    async def handler(scope, receive, send):
        nonlocal held
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": frame("first"), "more_body": True})
        if scope["query_string"] == b"hold=1":
            held += 1
            if held == IN_FLIGHT:
                all_held.set()
            await finish.wait()
        await send({"type": "http.response.body", "body": frame("second") + b"data: [DONE]\n\n"})

    upstream = script({CHAT: handler})
    async with (
        lmgate_process(upstream.url) as replica_a,
        lmgate_process(upstream.url) as replica_b,
        nginx("replicas.conf", lmgate_ports=[replica_a.port, replica_b.port]) as proxy,
        httpx.AsyncClient(timeout=10.0, trust_env=False) as client,
    ):
        answers: list[bytes] = []

        async def stream(query: str = "") -> None:
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
            async with client.stream("POST", proxy.base + CHAT + query, json=body) as response:
                assert response.status_code == 200, await response.aread()
                answers.append(b"".join([chunk async for chunk in response.aiter_raw()]))

        async with anyio.create_task_group() as in_flight:
            for _ in range(IN_FLIGHT):
                in_flight.start_soon(stream, "?hold=1")
            with anyio.fail_after(5):
                await all_held.wait()

            replica_a.process.send_signal(signal.SIGTERM)

            async def a_is_draining() -> bool:
                return (await client.get(replica_a.url + "/readyz")).status_code == 503

            await poll_until(a_is_draining, timeout=5, what="replica A never reported draining on /readyz")
            # NGINX keeps sending new requests to A (least_conn, max_fails=0); each is refused and
            # resent to B before anything reached the client.
            for _ in range(NEW_REQUESTS):
                await stream()
            assert (await client.get(proxy.base + "/readyz")).status_code == 200
            finish.set()

        assert answers == [ANSWER] * (IN_FLIGHT + NEW_REQUESTS)
        assert await replica_a.wait(timeout=10) == 0
        drain = {record["event"]: record for record in replica_a.logs() if record["event"].startswith("drain")}
        assert drain["drain_start"]["in_flight"] >= 1, "replica A had no stream to drain"
        assert drain["drain_end"]["completed"] is True

        # A is gone: NGINX fails to connect to it and moves on to B.
        for _ in range(3):
            await stream()
        assert answers[-3:] == [ANSWER] * 3

        moved = [line for line in proxy.access_log() if "us=503, 200" in line]
        assert moved, "no request was refused by the draining replica and resent\n" + "\n".join(proxy.access_log())
        assert all(f"127.0.0.1:{replica_a.port}, 127.0.0.1:{replica_b.port}" in line for line in moved)
        assert not [line for line in proxy.access_log() if '" 5' in line], "a client saw a 5xx"
