"""Client keys: ``Authorization: Bearer <key>`` checked against stored SHA-256 digests.

lmgate never holds a client key in plain text: the configuration lists ``sha256:<hex>`` digests
(``lmgate keys hash`` prints one), and a presented key is hashed and compared with every stored
digest by ``hmac.compare_digest``, without stopping at the first match, so the time taken does not
depend on which digest, if any, matched. Keys are long random strings, so an unsalted SHA-256 is
enough: there is no dictionary to attack.

* A request without a valid key is ``401 invalid_api_key`` (``WWW-Authenticate: Bearer``).
* A request that ``requires_admin`` (loading or unloading models, anything that changes state)
  needs one of ``admin_digests``; a valid client key there is ``403 permission_denied``.
* ``open_paths`` (health, readiness, metrics by default) are answered without a key, for GET/HEAD,
  to the clients ``open_from`` admits (all by default; :func:`loopback_client` for this machine
  only). Others need a key there too; with no keys configured they get ``403 permission_denied``.
* With no digests and no ``verifier`` the layer is off: every request passes (``open_from`` still
  holds for the open paths).
* A key is read from the ``Authorization`` and ``x-api-key`` headers only, never from the query
  string: URLs end up in access logs, browser histories and proxies' logs.

Decisions compare ``path_of(scope)`` exactly: put a layer in front that normalises the path (case,
escapes, dot segments) the way the application behind routes it; lmgate's gateway does.

The key's *identity* (its configured name, or ``key-`` and 8 hex digits of its digest: never
the key) is left in ``scope["state"]`` for the layers inside, such as a per-key concurrency limit
(``ConcurrencyMiddleware(client_key=client_identity)``) and the logs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping

from middleware.errors import ClientError, Unauthorized
from middleware.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "AuthMiddleware",
    "Forbidden",
    "client_identity",
    "hash_key",
    "is_admin",
    "loopback_client",
    "normalise_digest",
    "parse_keys_file",
]

_IDENTITY = "lmgate.client"
_ADMIN = "lmgate.admin"
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
_SAFE_METHODS = frozenset({"GET", "HEAD"})


class Forbidden(ClientError):
    status, code, type = 403, "permission_denied", "permission_error"
    default_message = "This route needs an admin key."


def hash_key(key: str) -> str:
    """The stored form of a client key: ``sha256:<64 lower-case hex digits>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def normalise_digest(text: str) -> str:
    """``sha256:<hex>`` or ``<hex>`` -> the 64 lower-case hex digits; ValueError otherwise."""
    match = _DIGEST.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            "expected a SHA-256 digest (64 hex digits, optionally prefixed 'sha256:'), not a key; "
            "`lmgate keys hash` prints the digest of a key"
        )
    return match.group(1).lower()


def parse_keys_file(text: str, *, source: str = "keys file") -> dict[str, str]:
    """Digests from a keys file: one ``sha256:<hex> [name]`` per line; ``#`` starts a comment."""
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        digest, _, name = content.partition(" ")
        try:
            value = normalise_digest(digest)
        except ValueError as exc:
            raise ValueError(f"{source}, line {number}: {exc}") from None
        digests[value] = name.strip() or _default_name(value)
    return digests


def _default_name(digest: str) -> str:
    return f"key-{digest[:8]}"


def _named(digests: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    if isinstance(digests, Mapping):
        return {normalise_digest(d): name for d, name in digests.items()}
    return {(value := normalise_digest(d)): _default_name(value) for d in digests}


def client_identity(scope: Scope) -> str | None:
    """The name of the key this request authenticated with (None: auth off or an open path)."""
    return (scope.get("state") or {}).get(_IDENTITY)


def is_admin(scope: Scope) -> bool:
    return bool((scope.get("state") or {}).get(_ADMIN))


def loopback_client(scope: Scope) -> bool:
    """Whether the client is on this machine: a loopback peer, and no forwarding header (added by
    a proxy on this machine, such as NGINX) naming another address as the client.

    The last ``X-Forwarded-For`` entry and ``X-Real-IP`` are the proxy's own word (NGINX's
    ``$proxy_add_x_forwarded_for`` appends the address it saw), so a remote client cannot
    pretend to be local by sending the header itself.
    """
    client = scope.get("client")
    if not client or not _is_loopback(client[0]):
        return False
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            if not _is_loopback(value.decode("latin-1").rsplit(",", 1)[-1]):
                return False
        elif name == b"x-real-ip" and not _is_loopback(value.decode("latin-1")):
            return False
    return True


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return (mapped or ip).is_loopback


def presented_key(scope: Scope) -> str | None:
    """``Authorization: Bearer <key>``, else ``x-api-key`` (Anthropic-style clients)."""
    fallback: str | None = None
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            fallback = value.decode("latin-1").strip()
    return fallback


class AuthMiddleware:
    """Check client keys; see the module docstring.

    Options:
        key_digests: SHA-256 digests of client keys (``{digest: name}`` to name them).
        admin_digests: digests of admin keys; they are valid client keys too.
        verifier: ``key -> identity or None``, consulted for keys no digest matched (a key store).
        open_paths: paths answered without a key (GET and HEAD only).
        open_from: ``scope -> bool``: the clients ``open_paths`` are open to (default: all).
        requires_admin: ``(method, path) -> bool``: the request changes state.
        path_of: the request's path below any mount point (default ``scope["path"]``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        key_digests: Mapping[str, str] | Iterable[str] = (),
        admin_digests: Mapping[str, str] | Iterable[str] = (),
        verifier: Callable[[str], str | None] | None = None,
        open_paths: Collection[str] = ("/healthz", "/readyz", "/metrics"),
        open_from: Callable[[Scope], bool] = lambda scope: True,
        requires_admin: Callable[[str, str], bool] = lambda method, path: False,
        path_of: Callable[[Scope], str] = lambda scope: scope["path"],
    ) -> None:
        self.app = app
        admins = _named(admin_digests)
        # Admin keys open every route; their digests are compared as client keys too.
        self._digests = [(bytes.fromhex(d), name, d in admins) for d, name in {**_named(key_digests), **admins}.items()]
        self.verifier = verifier
        self.open_paths = frozenset(open_paths)
        self.open_from = open_from
        self.requires_admin = requires_admin
        self.path_of = path_of
        self.enabled = bool(self._digests) or verifier is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], self.path_of(scope)
        if path in self.open_paths and method in _SAFE_METHODS:
            if self.open_from(scope):
                await self.app(scope, receive, send)
                return
            if not self.enabled:  # no key could open it: say why
                raise Forbidden(f"{path} is not open to this client.")
        elif not self.enabled:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        if key is None:
            raise _unauthorized(
                "No API key was sent: send 'Authorization: Bearer <key>' (a key in the URL's query string is not accepted)."
            )
        identity, admin = self._match(key)
        if identity is None:
            raise _unauthorized("The API key is not valid for this gateway.")
        if not admin and self.requires_admin(method, path):
            raise Forbidden(f"{method} {path} changes the gateway's or the upstream's state and needs an admin key.")
        state = scope.setdefault("state", {})
        state[_IDENTITY] = identity
        state[_ADMIN] = admin
        await self.app(scope, receive, send)

    def identify(self, key: str) -> tuple[str | None, bool]:
        """``(identity, admin)`` of ``key`` (``(None, False)``: not a valid key), for keys that do
        not come in a header: the WebSocket relay reads the SDK's key from its auth packet."""
        return self._match(key)

    def _match(self, key: str) -> tuple[str | None, bool]:
        # presented_key read the header as latin-1: hash the very bytes that came (UTF-8 keys included).
        digest = hashlib.sha256(key.encode("latin-1")).digest()
        identity, admin = None, False
        for stored, name, is_admin_key in self._digests:
            # No early exit: every digest is compared, whichever matches.
            if hmac.compare_digest(digest, stored):
                identity, admin = name, is_admin_key
        if identity is None and self.verifier is not None:
            identity = self.verifier(key)
        return identity, admin


def _unauthorized(message: str) -> Unauthorized:
    return Unauthorized(message, headers=[("WWW-Authenticate", 'Bearer realm="lmgate"')])
