"""``lmgate serve``: hypercorn, the start-up line, and graceful drain on SIGTERM/SIGINT.

Drain lives in hypercorn's ``shutdown_trigger`` because listeners close only after it returns:
while lmgate drains, new connections are still accepted and answered 503 ``draining`` with
``Connection: close`` (a load balancer moves them elsewhere), readiness says 503, and in-flight
streams finish. A second signal ends the wait at once.

The event loop is uvloop where it is installed (``listen.event_loop``): libuv does the socket
work in C, which cost lmgate a sixth less CPU per request and 5-10% less per chunk than asyncio's
own loop (docs/performance.md). Everything here runs on either; the client-connection cap is enforced where
hypercorn starts a connection, which both loops reach (gateway/server/connections.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
from hypercorn.asyncio import serve as hypercorn_serve

from gateway.app import Gateway
from gateway.config.settings import Config, ConfigError
from gateway.server.connections import ConnectionLimiter, connection_cap
from gateway.server.serving import bind_socket, format_url, hypercorn_app, hypercorn_config

logger = logging.getLogger("lmgate")

# After the drain deadline, how long aborted streams get to flush their error frames.
_ABORT_FLUSH_S = 2.0


def event_loop_options(event_loop: str) -> dict[str, object]:
    """``anyio.run``'s ``backend_options`` for ``listen.event_loop`` ("auto", "uvloop", "asyncio").

    auto: uvloop where it can be imported, else asyncio's loop. Raises ``ConfigError`` when uvloop
    is asked for and cannot be had (Windows has none; anyio would load winloop there instead).
    """
    if event_loop == "asyncio":
        return {}
    problem = "it does not run on Windows" if sys.platform == "win32" else None
    if problem is None:
        try:
            import uvloop  # noqa: F401
        except ImportError as exc:
            problem = f"it cannot be imported ({exc})"
    if problem is None:
        return {"use_uvloop": True}
    if event_loop == "uvloop":
        raise ConfigError(f"listen.event_loop: expected auto or asyncio here, got uvloop: {problem}")
    return {}


def running_event_loop() -> str:
    """``uvloop`` or ``asyncio``: the loop this coroutine runs on, for the start-up log line."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


async def serve(config: Config, *, simulate: bool = False, announce: Callable[[str], None] = print) -> int:
    """Serve until SIGTERM/SIGINT, drain, and return the exit code (0)."""
    connections = ConnectionLimiter(connection_cap(config, simulate=simulate))  # ConfigError before binding
    async with AsyncExitStack() as stack:
        # Bind before anything starts: a port in use ends start-up with one ListenError, not an
        # error group from the simulator's task group. hypercorn adopts (detaches) the socket
        # later, which makes this close a no-op.
        sock = bind_socket(config.listen.host, config.listen.port)
        stack.callback(sock.close)
        if simulate:
            from gateway.simulator import Simulator, default_models

            # One simulator per upstream, so a config listing several upstreams can be tried as is.
            simulated = []
            for upstream in config.upstream_list():
                simulator = await stack.enter_async_context(Simulator(models=default_models()))
                simulated.append(upstream.model_copy(update={"url": simulator.url}))
            key = "upstreams" if config.upstreams else "upstream"
            config = config.model_copy(update={key: tuple(simulated) if config.upstreams else simulated[0]})
        gateway = Gateway(config)
        if gateway.telemetry.metrics is not None:
            gateway.telemetry.metrics.watch_connections(connections)
        # Signals are caught from here on, so a SIGTERM during start-up drains instead of killing.
        signals = stack.enter_context(anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT))
        url = format_url(config.listen.host, sock.getsockname()[1])
        upstreams = config.upstream_list()
        what = "the built-in LM Studio simulator at " if simulate else ""
        if len(upstreams) > 1:
            what = ("simulated " if simulate else "") + "upstreams "
        where = ", ".join(u.url if len(upstreams) == 1 else f"{u.name} at {u.url}" for u in upstreams)
        # Start-up's objects (modules, config, the app) live as long as lmgate: frozen, out of the
        # collector's sight, a full collection walks only what requests made. Unfrozen, one took
        # ~70 ms under load, a stall in which a burst of connections piled up in the listen backlog
        # and was accepted at once, past the open-files limit (tests/security/test_resource_limits.py).
        gc.collect()
        gc.freeze()
        announce(f"lmgate listening on {url}, forwarding to {what}{where}")
        logger.info(
            "config loaded",
            extra={
                "event": "config_loaded",
                "listen": url,
                "upstream": ", ".join(u.url for u in upstreams),
                "metrics": config.metrics.enabled,
                "tracing": config.tracing.enabled,
                "event_loop": running_event_loop(),
            },
        )

        async def drain_on_signal() -> None:
            async for signum in signals:
                logger.info(
                    "draining",
                    extra={"event": "drain_start", "signal": signal.Signals(signum).name,
                           "in_flight": gateway.drain.in_flight, "timeout_s": config.drain.timeout_s},
                )
                break
            gateway.drain.start()
            finished = False
            async with anyio.create_task_group() as tg:

                async def second_signal() -> None:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return

                tg.start_soon(second_signal)
                finished = await gateway.drain.wait_idle(config.drain.timeout_s)
                tg.cancel_scope.cancel()
            aborted = 0
            if not finished:
                # Counted before the abort: the aborted streams leave in_flight as they flush.
                aborted = gateway.drain.in_flight
                gateway.drain.abort_remaining()
                await gateway.drain.wait_idle(_ABORT_FLUSH_S)
            logger.info(
                "drained",
                extra={"event": "drain_end", "completed": finished, "aborted": aborted},
            )

        hyper = hypercorn_config(sock, graceful_timeout_s=_ABORT_FLUSH_S, connections=connections)
        await hypercorn_serve(hypercorn_app(gateway), hyper, shutdown_trigger=drain_on_signal)
    return 0
