"""lmgate's own OpenAPI description (``GET /lmgate/openapi.json``, gateway/admin/openapi.py): valid, true
to the routes lmgate serves, and checked by a bounded schemathesis run against a real lmgate.

The run talks to lmgate over a real socket on 127.0.0.1, in front of the LM Studio simulator, with
client keys on, loading the description from lmgate itself. Schemathesis is synchronous
(``requests``), so the servers run in an event loop of their own on a blocking portal's thread while
its cases run in the test's thread.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import schemathesis
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.admin.openapi import OPENAPI_PATH, openapi_document
from gateway.admin.routes import _EXACT, LLM_HEALTH
from gateway.admin.status import PAGE_PATHS, STATUS_JSON
from gateway.app import build_app
from gateway.config.settings import Config
from gateway.models.admin import MODELS_PATH
from gateway.request.validation import _METHODS
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, Simulator
from middleware.auth import hash_key

MODEL = "qwen2.5-7b-instruct"  # the description's example model
CLIENT, ADMIN = "sk-client-aaaaaaaaaaaa", "sk-admin-cccccccccccc"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
# Keys on: the run also checks that every route outside auth.open_paths refuses a request without one.
DOCUMENT = {
    "auth": {"keys": [hash_key(CLIENT)], "admin_keys": [hash_key(ADMIN)]},
    "health": {"models": [MODEL]},
    "retry": {"backoff_base_s": 0.01},
}
SCHEMATHESIS = {
    "seed": 20240611,  # with the fixed budget below, CI runs the same cases every time
    "generation": {
        # The admin key is sent with every case; ignored_auth probes each route without it.
        "with-security-parameters": False,
        # Like most HTTP servers, lmgate ignores query parameters it does not know.
        "allow-extra-parameters": False,
    },
    "checks": {
        # A gateway: whether a model exists is LM Studio's answer, so valid bodies may get its 400.
        "positive_data_acceptance": {"enabled": False},
        # Documented 5xx are lmgate's answers (status_code_conformance and lmgate_errors check them).
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "501", "502", "503", "504"]},
    },
}
# Documents a health route answers 503 with (not errors: their status is the answer).
HEALTH_DOCUMENTS = {"/readyz", LLM_HEALTH}


def sim_models() -> list[SimModel]:
    fast = {"tokens_per_second": float("inf"), "ttft_base_s": 0.0, "ttft_per_prompt_token_s": 0.0, "load_delay_s": 0.01}
    embeddings = SimModel(id="text-embedding-nomic-embed-text-v1.5", type="embeddings", **fast)  # the example's
    return [SimModel(id=MODEL, loaded=True, **fast), embeddings]


@asynccontextmanager
async def lmgate_in_front_of_the_simulator(*, mount: str = "", **sections: Any) -> AsyncIterator[str]:
    """lmgate's URL, served on 127.0.0.1 (under ``mount`` in a Starlette app, when given)."""
    async with Simulator(models=sim_models()) as sim:
        app = build_app(Config.model_validate({"upstream": {"url": sim.url}, **sections}), env={})
        try:
            async with serve_in_background(Starlette(routes=[Mount(mount, app=app)]) if mount else app) as server:
                yield server.url + mount
        finally:
            await app.aclose()


@contextmanager
def served(**options: Any) -> Iterator[str]:
    """The servers run on a blocking portal's event loop: schemathesis is synchronous (``requests``)."""
    with start_blocking_portal("asyncio") as portal, portal.wrap_async_context_manager(
        lmgate_in_front_of_the_simulator(**options)
    ) as url:
        yield url


@pytest.fixture(scope="module")
def lmgate_url() -> Iterator[str]:
    with served(**DOCUMENT) as url:
        yield url


@pytest.fixture(scope="module")
def lmgate_schema(lmgate_url: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(SCHEMATHESIS)
    return schemathesis.openapi.from_url(lmgate_url + OPENAPI_PATH, headers=AS_ADMIN, config=config)


# --- the description ---------------------------------------------------------------------------


def test_the_description_is_valid_openapi_3_1():
    for auth in ({}, DOCUMENT["auth"]):
        schema = schemathesis.openapi.from_dict(openapi_document(Config.model_validate({"auth": auth})))
        schema.validate()  # against the OpenAPI 3.1 meta-schema
        assert all(result.ok() for result in schema.get_all_operations())


def test_lmgate_serves_its_description_and_every_route_in_it(lmgate_url):
    with httpx.Client(base_url=lmgate_url, headers=AS_ADMIN, timeout=10.0, trust_env=False) as client:
        served = client.get(OPENAPI_PATH)
        assert served.status_code == 200 and served.headers["content-type"] == "application/json"
        document = served.json()
        assert document == json.loads(json.dumps(openapi_document(Config.model_validate(DOCUMENT))))
        for path, item in document["paths"].items():
            for method, operation in item.items():
                body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("example")
                response = client.request(method, path.replace("{id}", MODEL), json=body)
                assert response.status_code in (200, 409), (method, path, response.text)  # 409: model_busy
                assert str(response.status_code) in operation["responses"], (method, path)


def test_every_get_route_of_lmgate_is_described():
    served = {*_EXACT, LLM_HEALTH, MODELS_PATH, f"{MODELS_PATH}/{{id}}", *PAGE_PATHS, STATUS_JSON, OPENAPI_PATH}
    served |= {path for path, methods in _METHODS.items() if "GET" in methods and path.startswith("/v1/")}
    described = {path for path, item in openapi_document(Config()).get("paths").items() if "get" in item}
    assert served - {"/lmgate"} == described  # /lmgate answers as /lmgate/ does


def test_keys_are_described_where_lmgate_asks_for_them():
    open_document = openapi_document(Config())
    assert "security" not in open_document and "securitySchemes" not in open_document["components"]
    keyed = openapi_document(Config.model_validate({"auth": DOCUMENT["auth"]}))
    assert keyed["security"] == [{"clientKey": []}]
    for path in ("/healthz", "/readyz", "/metrics"):  # auth.open_paths
        assert keyed["paths"][path]["get"]["security"] == [] and "401" not in keyed["paths"][path]["get"]["responses"]
    assert "403" in keyed["paths"]["/lmgate/models/{id}/load"]["post"]["responses"]
    assert "403" not in keyed["paths"]["/v1/chat/completions"]["post"]["responses"]
    # auth.open_from: loopback: a key (401 without) or, with no keys to give, 403 from other machines.
    local = openapi_document(Config.model_validate({"auth": {**DOCUMENT["auth"], "open_from": "loopback"}}))
    assert "401" in local["paths"]["/metrics"]["get"]["responses"]
    unkeyed = openapi_document(Config.model_validate({"auth": {"open_from": "loopback"}}))
    assert "403" in unkeyed["paths"]["/metrics"]["get"]["responses"] and "security" not in unkeyed


def test_metrics_are_described_only_when_served():
    assert "/metrics" not in openapi_document(Config.model_validate({"metrics": {"enabled": False}}))["paths"]


def test_mounted_the_description_names_the_mount_point_as_its_server():
    with served(mount="/llm") as url:
        schema = schemathesis.openapi.from_url(url + OPENAPI_PATH)
        assert schema.raw_schema["servers"] == [{"url": "/llm"}]
        response = schema["/healthz"]["GET"].Case().call()
    assert response.request.url == url + "/healthz" and response.status_code == 200


# --- a bounded schemathesis run against a real lmgate -----------------------------------------


def lmgate_errors(ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every 4xx, and every 5xx but the health documents, in the OpenAI shape with X-Lmgate-Error;
    no 500 at all (the simulator sends none here, so a 500 is a bug in lmgate)."""
    status = response.status_code
    assert status != 500, f"500 from lmgate: {response.text[:500]}"
    if status < 400 or (status == 503 and case.operation.path in HEALTH_DOCUMENTS):
        return None
    error = json.loads(response.content)["error"]
    assert {"message", "type", "code"} <= error.keys(), response.text
    assert response.headers["x-lmgate-error"] == [str(error["code"])], response.headers
    return None


schema = schemathesis.pytest.from_fixture("lmgate_schema")


@pytest.mark.slow
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@schema.parametrize()
def test_lmgate_answers_as_it_describes_itself(case):
    case.call_and_validate(headers=AS_ADMIN, additional_checks=[lmgate_errors], timeout=10)
