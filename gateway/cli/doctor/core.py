"""``diagnose(options)``: the troubleshooting guide's "Verifying Fixes" procedure as a report.

In order: who answers and which APIs (``probe``); an lmgate's upstreams as it sees them, and each
upstream of the config asked directly (when it names several); the models; a cold load if asked (unload, then
time the first token); a tiny prompt, twice at most (the "first attempt" check); N streamed
generations at a concurrency; then a verdict on silences (heartbeats) and the advice. Each step
is bounded by the per-request timeout, so the whole run is too.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
import httpx

from gateway.cli.doctor.advice import advise, judge_heartbeat
from gateway.cli.doctor.measure import TINY_PROMPT, chat_body, measure_chat, run_batch
from gateway.cli.doctor.probe import check_upstream, lmgate_upstreams, pick_model, probe_server, unload
from gateway.cli.doctor.report import Attempt, ColdLoad, Generations, Report, ServerInfo, TinyPrompt, UpstreamCheck
from gateway.config.settings import CLIENT_ENV
from gateway.proxy.upstream_errors import describe

Progress = Callable[[int, int, int], None]


@dataclass(frozen=True)
class DoctorOptions:
    url: str = "http://127.0.0.1:1234"
    requests: int = 10
    concurrency: int = 2
    model: str | None = None
    cold: str | None = None
    #: The heartbeat length a stream's silences are judged against (lmgate's models.heartbeat_s).
    heartbeat_s: float | None = 10.0
    #: Per request; 90 s is the troubleshooting guide's "after raising timeout to 90s".
    timeout_s: float = 90.0
    max_tokens: int = 32
    api_key: str | None = None
    #: lmgate's upstreams from its config when it names several: (name, url, key), each checked directly.
    upstreams: tuple[tuple[str, str, str | None], ...] = ()


async def diagnose(
    options: DoctorOptions, *, progress: Progress | None = None, env: Mapping[str, str] | None = None
) -> Report:
    env = os.environ if env is None else env
    url = options.url.rstrip("/")
    headers = {"authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    timeout = httpx.Timeout(connect=5.0, read=options.timeout_s, write=10.0, pool=options.timeout_s)
    async with httpx.AsyncClient(timeout=timeout, headers=headers, trust_env=False) as client:
        server, models = await probe_server(client, url)
        report = Report(server=server, models=models, environment={k: env[k] for k in CLIENT_ENV if k in env})
        if server.kind == "lmgate":
            try:
                report.upstreams = await lmgate_upstreams(client, url)
            except httpx.HTTPError as exc:  # it stopped answering after the probe: say so, check the rest
                server.error = server.error or f"its upstreams could not be read: {describe(exc)}"
        report.upstreams += await _check_upstreams(options)
        model = pick_model(models, options.model) if server.reachable else None
        if model is not None:
            await _examine(client, report, options, model, progress)
    report.advice = advise(report, url=url)
    return report


async def _check_upstreams(options: DoctorOptions) -> list[UpstreamCheck]:
    """Each upstream of the config, asked at once (one that hangs holds up none of the others)."""
    checks: list[UpstreamCheck | None] = [None] * len(options.upstreams)

    async def check(index: int, name: str, url: str, api_key: str | None) -> None:
        checks[index] = await check_upstream(name, url, api_key=api_key, timeout_s=options.timeout_s)

    async with anyio.create_task_group() as tg:
        for index, (name, url, api_key) in enumerate(options.upstreams):
            tg.start_soon(check, index, name, url, api_key)
    return [c for c in checks if c is not None]


async def _examine(
    client: httpx.AsyncClient, report: Report, options: DoctorOptions, model: str, progress: Progress | None
) -> None:
    url = report.server.url

    async def measure(name: str, *, prompt: str | None = None, max_tokens: int = options.max_tokens) -> Attempt:
        body = chat_body(name, max_tokens=max_tokens) if prompt is None else chat_body(name, prompt=prompt, max_tokens=1)
        return await measure_chat(client, url, body, timeout_s=options.timeout_s)

    silent: tuple[list[Attempt], str] | None = None
    if options.cold:
        report.cold, cold_attempt = await _cold_load(client, report.server, options.cold, measure)
        silent = ([cold_attempt], f"the cold load of {options.cold}")
    tiny = TinyPrompt([await measure(model, prompt=TINY_PROMPT)])
    if not tiny.attempts[0].ok:
        tiny.attempts.append(await measure(model, prompt=TINY_PROMPT))
    report.tiny_prompt = tiny
    attempts = await run_batch(
        lambda: measure(model), count=options.requests, concurrency=options.concurrency, progress=progress
    )
    report.generations = Generations(model, options.concurrency, attempts)
    attempts_seen, source = silent or (attempts, f"the {len(attempts)} generations")
    report.heartbeat = judge_heartbeat(options.heartbeat_s, attempts_seen, source)


async def _cold_load(
    client: httpx.AsyncClient, server: ServerInfo, model: str, measure: Callable[..., Awaitable[Attempt]]
) -> tuple[ColdLoad, Attempt]:
    """Unload ``model`` where the server allows it, then time a one-token answer from it."""
    cold = ColdLoad(model)
    try:
        cold.unloaded, cold.note = await unload(client, server, model)
    except httpx.HTTPError as exc:
        cold.note = f"the unload failed: {exc}"
    attempt = await measure(model, prompt=TINY_PROMPT)
    cold.ok = attempt.ok
    cold.first_token_s = round(attempt.ttft_s, 3) if attempt.ttft_s is not None else None
    cold.load_s = attempt.load_s
    if not attempt.ok:
        cold.note = f"{attempt.category}: {attempt.message}"
    return cold, attempt
