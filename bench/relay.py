"""What lmgate's dependencies cost on their own: a bare relay, and lmgate on other servers.

    python -m bench.relay --app relay|lmgate --server hypercorn|uvicorn --loop asyncio|uvloop
                          [--client httpx|httpx2|aiohttpx|aiohttp] --upstream URL [--config FILE]

Prints ``relay listening on http://127.0.0.1:PORT`` on stderr.

* ``--app relay``: the least an ASGI proxy on httpx can do: read the body, send it upstream with
  one pooled ``httpx.AsyncClient`` in streaming mode, relay every raw chunk as one ASGI message.
  No middleware, no JSON, no watcher task. Its cost is the floor that hypercorn (or uvicorn),
  httpx and the event loop set; lmgate cannot be cheaper than this on the same stack.
  ``--client httpx2`` uses Pydantic's fork of httpx (same API; its httpcore2 pool assigns requests
  in O(connections) where httpcore 1.0 rescans every connection for every idle one).
  ``--client aiohttpx`` keeps httpx's API over aiohttp's I/O (the ``httpx-aiohttp`` package's
  transport); ``--client aiohttp`` relays with aiohttp's own client, whatever has arrived at once
  (``iter_any``). Both measure how much of a chunk's cost is httpcore and h11 (issue 17).
  ``--client lmgate`` is lmgate's own upstream client (httpx over lmgate's aiohttp transport,
  ``make_upstream_client``): on hypercorn and uvloop this is the ``relay`` leg, lmgate's stack
  without its layers, the anchor of the "layers nearly free" target.
* ``--app lmgate``: ``gateway.app.build_app`` (the public entry point) on the chosen server and
  loop, so the server's and the loop's share of lmgate's cost can be read off directly.

The ``relay`` leg (``--app relay --server hypercorn --loop uvloop --client lmgate``) is in the
default run: it needs nothing lmgate does not. The other legs are diagnostics (``python -m bench
--legs ...``); uvicorn and the other clients are not lmgate dependencies and must be installed in the
interpreter given with ``--alt-python``. The relay watches no disconnect (hypercorn drops sends to a
client that left): it reads its upstream to the end, so its cancel storm passes no cancel on.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

Scope = dict[str, Any]


async def _lifespan(receive: Any, send: Any, close: Any, start: Any = None) -> None:
    """Answer the server's lifespan events; ``start()`` before serving, ``close()`` the upstream client at shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if start is not None:
                start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Any) -> bytes:
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


class Relay:
    def __init__(self, upstream: str, client: str = "httpx") -> None:
        self.upstream = upstream.rstrip("/")
        self.httpx: Any = __import__("httpx" if client in ("aiohttpx", "lmgate") else client)
        self.over_aiohttp = client == "aiohttpx"
        self.lmgate_client = client == "lmgate"
        self.client: Any = None

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def _start(self) -> None:
        # lmgate's client (and the gateway imports behind it) is made before serving, as lmgate makes
        # its own, so the first measured request does not pay for the imports.
        if self.lmgate_client:
            self.client = _lmgate_client(self.upstream)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.aclose, self._start)
            return
        if self.client is None:
            limits = self.httpx.Limits(max_connections=2048, max_keepalive_connections=128)
            transport = None
            if self.over_aiohttp:
                from httpx_aiohttp import AiohttpTransport

                transport = AiohttpTransport(limits=limits, trust_env=False)
            self.client = self.httpx.AsyncClient(
                timeout=self.httpx.Timeout(600.0, connect=5.0), limits=limits, transport=transport, trust_env=False
            )
        body = await _read_body(receive)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"connection", b"content-length")]
        request = self.client.build_request(scope["method"], self.upstream + scope["path"], headers=headers, content=body)
        response = await self.client.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in (b"connection", b"transfer-encoding", b"keep-alive")]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def _lmgate_client(upstream: str) -> Any:
    """lmgate's own upstream client (httpx over lmgate's aiohttp transport), sized like the bench's
    lmgate legs: the relay then differs from lmgate only by lmgate's layers."""
    from gateway.config.settings import Config
    from gateway.upstreams.upstream import make_upstream_client

    config = Config.model_validate({
        "upstream": {"url": upstream, "pool": {"max_keepalive_connections": 128}},
        "concurrency": {"limit": 2048, "max_queue": 2048},
    })
    return make_upstream_client(config)


class AiohttpRelay:
    """The same relay on aiohttp's own client: each chunk as it arrived (``iter_any``)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: Any = None

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        import aiohttp

        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.aclose)
            return
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=2048, limit_per_host=2048, keepalive_timeout=30)
            self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600, connect=5),
                                                 auto_decompress=False, trust_env=False)
        body = await _read_body(receive)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k not in (b"host", b"connection", b"content-length")]
        async with self.session.request(scope["method"], self.upstream + scope["path"], headers=headers, data=body) as response:
            out = [(k.lower(), v) for k, v in response.raw_headers
                   if k.lower() not in (b"connection", b"transfer-encoding", b"keep-alive")]
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("--app", choices=["relay", "lmgate"], default="relay")
    parser.add_argument("--server", choices=["hypercorn", "uvicorn"], default="hypercorn")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--client", choices=["httpx", "httpx2", "aiohttpx", "aiohttp", "lmgate"], default="httpx",
                        help="--app relay only")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--config", help="lmgate config file (--app lmgate)")
    args = parser.parse_args(argv)
    if args.app == "relay":
        app: Any = AiohttpRelay(args.upstream) if args.client == "aiohttp" else Relay(args.upstream, args.client)
    else:
        from gateway.app import build_app
        from gateway.config.settings import load_config

        config = load_config(args.config, overrides={("upstream", "url"): args.upstream})
        app = build_app(config)
    sock = _socket()
    port = sock.getsockname()[1]
    print(f"relay listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    if args.server == "uvicorn":
        import uvicorn

        uvicorn.run(app, fd=sock.fileno(), loop=args.loop, http="httptools" if _has("httptools") else "h11",
                    lifespan="on", access_log=False, log_level="warning", timeout_keep_alive=75)
        return 0
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.read_timeout = None
    config.keep_alive_timeout = 75.0
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(app, config))
    else:
        asyncio.run(serve(app, config))
    return 0


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
