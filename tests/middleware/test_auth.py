"""AuthMiddleware on its own: keys checked by digest, admin routes, open paths, the identity left
for inner layers, and the digest helpers."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from middleware.auth import (
    AuthMiddleware,
    client_identity,
    hash_key,
    is_admin,
    loopback_client,
    normalise_digest,
    parse_keys_file,
)
from middleware.errors import ErrorMiddleware
from middleware.types import Receive, Scope, Send

pytestmark = pytest.mark.anyio

CLIENT, ADMIN = "sk-client-0123456789abcdef", "sk-admin-fedcba9876543210"


async def whoami(scope: Scope, receive: Receive, send: Send) -> None:
    body = f"{client_identity(scope)}|{is_admin(scope)}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def app(**options: Any) -> ErrorMiddleware:
    defaults: dict[str, Any] = {
        "key_digests": {normalise_digest(hash_key(CLIENT)): "team-a"},
        "admin_digests": [hash_key(ADMIN)],
        "requires_admin": lambda method, path: method == "POST" and path.startswith("/admin/"),
    }
    return ErrorMiddleware(AuthMiddleware(whoami, **{**defaults, **options}))


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app()), base_url="http://lmgate") as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "No API key"),
        (bearer("wrong"), "not valid"),
        (bearer(hash_key(CLIENT)), "not valid"),  # the digest itself is not a key
        ({"Authorization": f"Basic {CLIENT}"}, "No API key"),
        ({"Authorization": "Bearer "}, "No API key"),
    ],
)
async def test_a_missing_or_wrong_key_is_401_in_the_openai_shape(client, headers, why):
    response = await client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["x-lmgate-error"] == "invalid_api_key"
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and why in error["message"]
    assert CLIENT not in response.text


@pytest.mark.parametrize(
    ("headers", "identity"),
    [
        (bearer(CLIENT), "team-a|False"),
        ({"authorization": f"bearer {CLIENT}"}, "team-a|False"),
        ({"x-api-key": CLIENT}, "team-a|False"),  # Anthropic-style clients
        (bearer(ADMIN), f"key-{normalise_digest(hash_key(ADMIN))[:8]}|True"),
    ],
)
async def test_a_valid_key_passes_with_its_name_and_never_the_key(client, headers, identity):
    response = await client.get("/v1/models", headers=headers)
    assert response.status_code == 200 and response.text == identity


async def test_state_changing_routes_need_an_admin_key(client):
    denied = await client.post("/admin/models/load", headers=bearer(CLIENT))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    assert (await client.post("/admin/models/load")).status_code == 401
    assert (await client.post("/admin/models/load", headers=bearer(ADMIN))).status_code == 200
    assert (await client.get("/admin/models", headers=bearer(CLIENT))).status_code == 200


@pytest.mark.parametrize(("method", "status"), [("GET", 200), ("HEAD", 200), ("POST", 401)])
async def test_open_paths_answer_reads_without_a_key(client, method, status):
    response = await client.request(method, "/healthz")
    assert response.status_code == status
    if status == 200 and method == "GET":
        assert response.text == "None|False"


async def test_without_keys_the_layer_is_off():
    transport = httpx.ASGITransport(ErrorMiddleware(AuthMiddleware(whoami)))
    async with httpx.AsyncClient(transport=transport, base_url="http://lmgate") as c:
        assert (await c.post("/admin/anything")).status_code == 200


@pytest.mark.parametrize(
    ("peer", "headers", "local"),
    [
        ("127.0.0.1", [], True),
        ("127.8.9.10", [], True),
        ("::1", [], True),
        ("::ffff:127.0.0.1", [], True),  # a dual-stack socket's IPv4 peer
        ("192.0.2.7", [], False),
        ("::ffff:192.0.2.7", [], False),
        (None, [], False),
        # Through a proxy on this machine: its X-Forwarded-For entry (the last) names the client.
        ("127.0.0.1", [(b"x-forwarded-for", b"203.0.113.9")], False),
        ("127.0.0.1", [(b"x-forwarded-for", b"127.0.0.1")], True),
        ("127.0.0.1", [(b"x-forwarded-for", b"127.0.0.1, 203.0.113.9")], False),
        ("127.0.0.1", [(b"x-forwarded-for", b"203.0.113.9, 127.0.0.1")], True),  # forged by the client, appended by NGINX
        ("127.0.0.1", [(b"x-real-ip", b"203.0.113.9")], False),
        ("127.0.0.1", [(b"x-forwarded-for", b"not an address")], False),
        ("192.0.2.7", [(b"x-forwarded-for", b"127.0.0.1")], False),  # a remote peer cannot claim to be local
    ],
)
def test_loopback_clients(peer, headers, local):
    scope = {"type": "http", "client": (peer, 50000) if peer else None, "headers": headers}
    assert loopback_client(scope) is local


@pytest.mark.parametrize(
    ("keys", "forwarded_for", "without_key", "with_key"),
    [
        (True, None, 200, 200),
        (True, "203.0.113.9", 401, 200),  # a remote client needs a key on the open paths too
        (False, None, 200, 200),
        (False, "203.0.113.9", 403, 403),  # no key could open it: 403, not 401
    ],
)
async def test_open_paths_can_be_open_to_loopback_clients_only(keys, forwarded_for, without_key, with_key):
    options: dict[str, Any] = {"open_from": loopback_client}
    if not keys:
        options.update(key_digests=(), admin_digests=())
    headers = {"x-forwarded-for": forwarded_for} if forwarded_for else {}
    transport = httpx.ASGITransport(app(**options), client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://lmgate") as c:
        assert (await c.get("/healthz", headers=headers)).status_code == without_key
        assert (await c.get("/healthz", headers={**headers, **bearer(CLIENT)})).status_code == with_key
        # Other routes are as before: a key with keys configured, open without.
        assert (await c.get("/v1/models", headers=headers)).status_code == (401 if keys else 200)


async def test_a_verifier_is_asked_for_keys_no_digest_matched():
    seen: list[str] = []

    def verifier(key: str) -> str | None:
        seen.append(key)
        return "from-store" if key == "stored-key" else None

    transport = httpx.ASGITransport(app(verifier=verifier))
    async with httpx.AsyncClient(transport=transport, base_url="http://lmgate") as c:
        assert (await c.get("/v1/models", headers=bearer("stored-key"))).text == "from-store|False"
        assert (await c.get("/v1/models", headers=bearer("other"))).status_code == 401
        assert (await c.get("/v1/models", headers=bearer(CLIENT))).text == "team-a|False"
    assert seen == ["stored-key", "other"]


def test_every_digest_is_compared_whichever_matches(monkeypatch):
    # Constant time: hmac.compare_digest runs for every stored digest, with no early exit.
    import middleware.auth as auth

    calls: list[bytes] = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    digests = [hash_key(f"key-{n}") for n in range(5)]
    layer = AuthMiddleware(whoami, key_digests=digests)
    for key in ("key-0", "key-4", "nobody"):
        calls.clear()
        layer._match(key)
        assert len(calls) == 5


def test_digests_are_normalised_and_keys_refused():
    hexdigest = hashlib.sha256(b"k").hexdigest()
    assert normalise_digest(f"sha256:{hexdigest.upper()}") == hexdigest == normalise_digest(f" {hexdigest} ")
    with pytest.raises(ValueError, match="lmgate keys hash"):
        normalise_digest("sk-plain-key")
    assert hash_key("k") == f"sha256:{hexdigest}"


def test_a_keys_file_names_keys_and_points_at_a_bad_line():
    a, b = hash_key("a"), hash_key("b")
    text = f"# team keys\n{a} alice\n\n{b}   # no name\n"
    assert parse_keys_file(text) == {normalise_digest(a): "alice", normalise_digest(b): f"key-{normalise_digest(b)[:8]}"}
    with pytest.raises(ValueError, match="keys.txt, line 2"):
        parse_keys_file(f"{a}\nsecret-key bob\n", source="keys.txt")


async def test_a_key_that_is_not_ascii_matches_its_digest():
    # Header values arrive as bytes and are read as latin-1; the digest is of the key's UTF-8 bytes,
    # so the presented key is hashed from the bytes that came, not from a re-encoded string.
    key = "sk-clé-0123456789"
    gateway = app(key_digests={normalise_digest(hash_key(key)): "accented"})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(gateway), base_url="http://lmgate") as c:
        response = await c.get("/v1/models", headers=[(b"authorization", b"Bearer " + key.encode("utf-8"))])
    assert response.status_code == 200 and response.text == "accented|False"
