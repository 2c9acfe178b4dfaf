"""Shared fixtures: anyio on asyncio, real servers on free 127.0.0.1 ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from gateway.serving import serve_in_background
from middleware.types import Receive, Scope, Send

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ScriptedUpstream:
    """A stand-in upstream whose behaviour each test scripts with ``handler``.

    It records every request (scope and body) and notices disconnects, so a test can assert what
    the gateway sent and that it hung up. Handlers must not call ``receive`` (a watcher does); a
    handler that streams until the client leaves waits on ``disconnected``. Used for proxy unit tests; behaviour-level tests use the
    LM Studio simulator.
    """

    def __init__(self) -> None:
        self.url = ""
        self.handler: Handler | None = None
        self.requests: list[tuple[Scope, bytes]] = []
        self.disconnected = anyio.Event()
        self.disconnect_time: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append((scope, body))
        assert self.handler is not None, "the test did not script the upstream"

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnect_time = anyio.current_time()
            self.disconnected.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await self.handler(scope, receive, send)
            tg.cancel_scope.cancel()


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    scripted = ScriptedUpstream()
    async with serve_in_background(scripted) as server:
        scripted.url = server.url
        yield scripted
