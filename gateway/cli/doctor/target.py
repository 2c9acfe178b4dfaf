"""Which server ``lmgate doctor`` checks, and why, in one line.

In order: ``--url``; lmgate's listen address from ``--config``; an lmgate answering on its default
address (the doctor is usually run beside it); else LM Studio's default address. An lmgate is
recognised by ``GET /healthz`` answering ``{"status": "ok"}``: LM Studio answers an unknown route
with 200 and an ``error`` field instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from gateway.config.settings import Config, ListenConfig
from gateway.server.serving import format_url

LMGATE_DEFAULT = format_url(ListenConfig().host, ListenConfig().port)
LM_STUDIO_DEFAULT = "http://127.0.0.1:1234"


@dataclass(frozen=True)
class Target:
    url: str
    #: "lmgate", "LM Studio", or "" when the user named the server.
    kind: str
    why: str

    def describe(self) -> str:
        what = f"{self.kind} at {self.url}" if self.kind else self.url
        return f"checking {what} ({self.why})"


def given_target(url: str | None, config_file: str | None, config: Config | None) -> Target | None:
    """The server the user named with ``--url`` or ``--config``; None when they named none."""
    if url:
        return Target(url, "", "given with --url")
    if config is not None:
        # A wildcard listen address is reached on the loopback address.
        host = config.listen.host if config.listen.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return Target(format_url(host, config.listen.port), "lmgate", f"its listen address in {config_file}")
    return None


async def default_target(
    *, lmgate_url: str = LMGATE_DEFAULT, lm_studio_url: str = LM_STUDIO_DEFAULT, timeout_s: float = 2.0
) -> Target:
    """An lmgate on its default address if one answers there, else LM Studio's default address."""
    port = lmgate_url.rsplit(":", 1)[-1]
    if await answers_as_lmgate(lmgate_url, timeout_s=timeout_s):
        return Target(lmgate_url, "lmgate", "it answered on lmgate's default port")
    return Target(lm_studio_url, "LM Studio", f"no lmgate answered on {port}; pass --url to choose")


async def answers_as_lmgate(url: str, *, timeout_s: float) -> bool:
    try:
        async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
            response = await client.get(url + "/healthz")
            return response.status_code == 200 and response.json() == {"status": "ok"}
    except (httpx.HTTPError, ValueError):
        return False
