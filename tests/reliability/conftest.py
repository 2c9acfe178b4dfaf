"""The fault suite's harness: the whole gateway in front of the simulator, and leak accounting.

Everything runs in the test's event loop over real sockets on 127.0.0.1, so the counts below
cover the gateway, the simulator and the test's client together. A count is taken only in a
*quiet* state: every idle keep-alive connection (the test client's to lmgate, lmgate's pool to the
simulator) is closed first, so what is left open was leaked, not pooled. Between "a socket was
closed" and "the server's task for it ended" no event can be awaited, so :meth:`Leaks.assert_none`
retries its check a bounded number of times within a bounded time.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import Gateway, build_app
from gateway.config.settings import Config
from gateway.proxy.aiohttp_transport import AiohttpTransport
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, Simulator
from tests.deploy.conftest import lmgate_process  # noqa: F401  lmgate as its own process, as deployed (test_soak)

WARM = "qwen2.5-7b-instruct"
SLOW = "slow-7b"  # 20 tokens/s: a stream to leave in the middle of
COLD = "cold-8b"  # a 1.5 s JIT load
MESSAGES = [{"role": "user", "content": "Tell me about gateways."}]


def chat(model: str = WARM, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


def sim_models() -> list[SimModel]:
    return [
        SimModel(id=WARM, loaded=True, parallel=8, load_delay_s=0.05, tokens_per_second=400.0, ttft_base_s=0.005,
                 ttft_per_prompt_token_s=0.0),
        SimModel(id=SLOW, loaded=True, parallel=600, tokens_per_second=20.0, ttft_base_s=0.005, ttft_per_prompt_token_s=0.0),
        SimModel(id=COLD, load_delay_s=1.5, tokens_per_second=400.0),
    ]


def gateway_config(upstream_url: str, **sections: dict[str, Any]) -> Config:
    document: dict[str, Any] = {"upstream": {"url": upstream_url}, "retry": {"backoff_base_s": 0.01}}
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    return Config.model_validate(document)


@dataclass(frozen=True)
class Running:
    url: str
    app: Gateway


@asynccontextmanager
async def running_gateway(upstream_url: str, **sections: dict[str, Any]) -> AsyncIterator[Running]:
    app = build_app(gateway_config(upstream_url, **sections))
    try:
        async with serve_in_background(app) as server:
            yield Running(server.url, app)
    finally:
        await app.aclose()


# --- leak accounting --------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    tasks: int
    fds: int
    upstream_in_use: int

    def __str__(self) -> str:
        return f"{self.tasks} tasks, {self.fds} fds, {self.upstream_in_use} upstream connections in use"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pool(client: httpx.AsyncClient) -> Any:
    transport = client._transport  # type: ignore[attr-defined]
    transport = getattr(transport, "transport", transport)  # lmgate's FramingGuard wraps httpx's transport
    return transport._pool  # httpcore's pool: no public view


def connections_in_use(client: httpx.AsyncClient) -> int:
    """Pooled connections carrying a request (neither idle nor closed), plus requests waiting."""
    transport = client._transport  # type: ignore[attr-defined]
    if isinstance(transport, AiohttpTransport):
        return transport.connections_in_use()
    pool = _pool(client)
    busy = sum(1 for c in pool.connections if not c.is_idle() and not c.is_closed())
    return busy + len(pool._requests)


async def close_idle(client: httpx.AsyncClient) -> None:
    transport = client._transport  # type: ignore[attr-defined]
    if isinstance(transport, AiohttpTransport):
        await transport.close_idle()
        return
    for connection in list(_pool(client).connections):
        if connection.is_idle():
            await connection.aclose()


class Leaks:
    """Counts before and after a scenario, in the quiet state described in the module docstring."""

    def __init__(self, gateway: Gateway, *clients: httpx.AsyncClient) -> None:
        self.gateway = gateway
        self.clients = clients
        self.before: Counts | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def count(self) -> Counts:
        for client in (*self.clients, self.gateway.client):
            await close_idle(client)
        return Counts(len(asyncio.all_tasks()), open_fds(), connections_in_use(self.gateway.client))

    async def baseline(self) -> Counts:
        self.before = await self.settled(lambda now: now.upstream_in_use == 0)
        self._tasks = set(asyncio.all_tasks())
        return self.before

    def _new_tasks(self) -> str:
        import io
        out = io.StringIO()
        for t in asyncio.all_tasks() - self._tasks:
            coro: Any = t.get_coro()
            while coro is not None:
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
                if frame is not None:
                    out.write(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name} > ")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
            out.write("\n")
        return out.getvalue()

    async def assert_none(self, *, timeout_s: float = 5.0) -> Counts:
        """Fail unless tasks, descriptors and upstream connections are back to the baseline."""
        before = self.before
        assert before is not None, "call baseline() first"
        return await self.settled(
            lambda now: now.upstream_in_use == 0 and now.tasks <= before.tasks and now.fds <= before.fds,
            timeout_s=timeout_s,
        )

    async def settled(self, ok: Callable[[Counts], bool], *, timeout_s: float = 5.0) -> Counts:
        # The quiet state: two equal counts in a row that satisfy ``ok``.
        deadline = anyio.current_time() + timeout_s
        previous = None
        for _ in range(1000):
            now = await self.count()
            if ok(now) and now == previous:
                return now
            if anyio.current_time() > deadline:
                raise AssertionError(f"leak: before {self.before}; after {now}; new tasks: {self._new_tasks()}")
            previous = now
            await anyio.sleep(0.02)
        raise AssertionError(f"leak: before {self.before}; after {previous}")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(models=sim_models(), control=True) as simulator:
        yield simulator


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


@pytest.fixture
def start_gateway() -> Callable[..., Any]:
    """``async with start_gateway(sim.url, timeouts={...}) as gw``: gw.url, gw.app (the Gateway)."""
    return running_gateway


@pytest.fixture
def leaks_of(client: httpx.AsyncClient) -> Callable[..., Leaks]:
    """``leaks = leaks_of(gw, *more_clients)``; ``await leaks.baseline()``; scenario;
    ``await leaks.assert_none()``."""
    return lambda running, *clients: Leaks(running.app, client, *clients)


@pytest.fixture
def body() -> Callable[..., dict[str, Any]]:
    """``body(model, stream=True)``: a chat request."""
    return chat
