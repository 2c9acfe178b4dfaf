"""Use one lmgate middleware alone, around your own Starlette (or FastAPI) endpoints.

Here an existing app that streams from a local model gets lmgate's timeouts and concurrency limit
without the rest of the gateway. With FastAPI it is the same: ``app.add_middleware(
TimeoutMiddleware, first_token_s=45, idle_s=30, total_s=600)``. The test suite imports
``create_app`` and checks both behaviours (tests/gateway/test_examples.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from middleware.concurrency import ConcurrencyMiddleware
from middleware.errors import ErrorMiddleware
from middleware.timeout import TimeoutMiddleware

TokenSource = Callable[[], AsyncIterator[str]]


def create_app(tokens: Callable[[Request], Awaitable[AsyncIterator[str]]], *, first_token_s: float = 45.0,
               idle_s: float = 30.0, limit: int = 4) -> Starlette:
    async def generate(request: Request) -> StreamingResponse:
        source = await tokens(request)

        async def frames() -> AsyncIterator[bytes]:
            async for token in source:
                yield f"data: {token}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    return Starlette(
        routes=[Route("/generate", generate, methods=["POST"])],
        middleware=[
            # Outermost first. ErrorMiddleware renders lmgate's errors from any inner layer.
            Middleware(ErrorMiddleware),
            Middleware(ConcurrencyMiddleware, limit=limit, max_queue=8, max_wait_s=30.0),
            Middleware(TimeoutMiddleware, first_token_s=first_token_s, idle_s=idle_s, total_s=600.0),
        ],
    )
