"""Mount the whole lmgate gateway under /llm in an existing Starlette (or FastAPI) app.

Run it with any ASGI server, e.g. ``hypercorn docs.examples.mount_gateway:app``. The test suite
imports ``create_app`` and streams a chat completion through it (tests/gateway/test_examples.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from gateway.app import build_app
from gateway.config.settings import Config, load_config


def create_app(config: Config) -> Starlette:
    llm = build_app(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # Starlette does not forward lifespan events to mounted apps: close lmgate's pool here.
        await llm.aclose()

    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"app": "mine", "llm": str(request.url_for("llm", path="/v1/models"))})

    return Starlette(routes=[Route("/", home), Mount("/llm", app=llm, name="llm")], lifespan=lifespan)


if __name__ != "__main__":
    # For `hypercorn docs.examples.mount_gateway:app`: lmgate's defaults (LM Studio on :1234).
    app = create_app(load_config(None))
