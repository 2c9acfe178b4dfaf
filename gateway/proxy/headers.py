"""Which headers cross the gateway, in each direction, and what lmgate adds.

Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and are never forwarded, nor is any
header the ``Connection`` header names. ``Host`` is set by httpx from the upstream URL. The
client's ``Authorization`` is dropped unless configured otherwise: it holds the client's key for
lmgate, not LM Studio's token.
"""

from __future__ import annotations

from collections.abc import Iterable

from middleware.types import Scope

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Peers whose X-Forwarded-Proto/-Host are believed: a proxy on the same machine (NGINX in front).
LOOPBACK_PROXIES = frozenset({"127.0.0.1", "::1"})
# Set by the gateway itself on the upstream request.
_REPLACED_UPSTREAM = frozenset(
    {b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}
)
_REPLACED_DOWNSTREAM = frozenset({b"x-request-id", b"server", b"date"})


def _connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


def upstream_request_headers(
    scope: Scope,
    *,
    request_id: str,
    api_key: str | None,
    forward_client_auth: bool,
    trusted_proxies: frozenset[str] = LOOPBACK_PROXIES,
) -> list[tuple[bytes, bytes]]:
    """Headers for the upstream request built from the client's request.

    ``X-Forwarded-For`` gets the peer appended. ``X-Forwarded-Proto``/``-Host`` describe the
    original request, so they are kept when the peer is a trusted proxy (NGINX terminating TLS
    says ``https``) and set from this hop otherwise, so a client cannot forge them.
    """
    client_headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    dropped = HOP_BY_HOP | _REPLACED_UPSTREAM | _connection_named(client_headers)
    if api_key is not None or not forward_client_auth:
        # `api-key` is how Azure-style OpenAI clients send theirs.
        dropped = dropped | {b"authorization", b"x-api-key", b"api-key"}
    headers: list[tuple[bytes, bytes]] = []
    forwarded_for = b""
    host = b""
    proxied_proto = proxied_host = b""
    for key, value in client_headers:
        name = key.lower()
        if name == b"x-forwarded-for":
            forwarded_for = value
        elif name == b"host":
            host = value
        elif name == b"x-forwarded-proto":
            proxied_proto = value
        elif name == b"x-forwarded-host":
            proxied_host = value
        if name not in dropped:
            headers.append((name, value))
    client: tuple[str, int] | None = scope.get("client")
    trusted = bool(client and client[0] in trusted_proxies)
    if client:
        peer = client[0].encode("latin-1")
        forwarded_for = forwarded_for + b", " + peer if forwarded_for else peer
    if forwarded_for:
        headers.append((b"x-forwarded-for", forwarded_for))
    proto = proxied_proto if trusted and proxied_proto else scope.get("scheme", "http").encode("latin-1")
    headers.append((b"x-forwarded-proto", proto))
    host = proxied_host if trusted and proxied_host else host
    if host:
        headers.append((b"x-forwarded-host", host))
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    if api_key is not None:
        headers.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
    return headers


def downstream_response_headers(
    upstream_headers: Iterable[tuple[bytes, bytes]],
    *,
    request_id: str,
    event_stream: bool,
) -> list[tuple[bytes, bytes]]:
    """Headers for the client's response built from the upstream's response."""
    upstream_headers = list(upstream_headers)
    dropped = HOP_BY_HOP | _REPLACED_DOWNSTREAM | _connection_named(upstream_headers)
    if event_stream:
        dropped = dropped | {b"cache-control", b"x-accel-buffering", b"content-length"}
    headers = [(key.lower(), value) for key, value in upstream_headers if key.lower() not in dropped]
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    if event_stream:
        # NGINX and other buffering proxies would otherwise hold SSE frames back.
        headers.append((b"cache-control", b"no-cache"))
        headers.append((b"x-accel-buffering", b"no"))
    return headers
