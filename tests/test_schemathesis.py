"""Property-based API tests from our own OpenAPI schema: no 5xx, every response as documented.

For every operation in /schema/openapi.json, schemathesis generates valid requests and, for
operations with parameters, invalid ones, and checks status codes, content types, headers and
bodies against the schema. Bounded to 25 examples per operation and mode. The app has an
``api_token``, as it must off loopback: every call carries it. It runs under real uvicorn on
127.0.0.1 with the default host and origin rules (``access.RequestGuard``): every call names
``Host: 127.0.0.1:<port>`` as any client does, and the same server refuses another host.

(schemathesis.pytest.from_fixture fails on pytest 9 — it sets ``node._nodeid`` — so each test
draws the operation's cases with hypothesis directly.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.schemas import OpenApiSchema

from moneylion.api import create_app
from moneylion.config import load_config
from tests.conftest import Loaded, serving

TOKEN = "schemathesis-token-0123456789"  # noqa: S105 - a test token


def _cases() -> list[tuple[str, GenerationMode]]:
    """(operation label, mode) from the schema of an app never started (no warehouse needed).

    Negative cases only for operations with parameters: there is nothing else to get wrong.
    """
    app = create_app(load_config(environ={}).with_overrides(api_token=TOKEN))
    cases = []
    for path, item in sorted((app.openapi_schema.paths or {}).items()):
        if item.get is not None:
            cases.append((f"GET {path}", GenerationMode.POSITIVE))
            if item.get.parameters:
                cases.append((f"GET {path}", GenerationMode.NEGATIVE))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def base_url(loaded: Loaded) -> Iterator[str]:
    """The app with the project's defaults for hosts and origins (nothing allowed beyond the
    loopback names), served by uvicorn on 127.0.0.1. No limit on failed tokens: schemathesis
    checks that each broken token is answered 401, which the limit would turn into 429 after
    ten (the limit has its own tests)."""
    config = loaded.config.with_overrides(
        api_token=TOKEN, allowed_hosts=[], trusted_proxies=[], auth_failures_per_minute=0
    )
    with serving(create_app(config, loaded.conn)) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> OpenApiSchema:
    # schemathesis sends the token itself (so its negative cases can leave it out or break it).
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"bearer": {"bearer": TOKEN}}}})
    return schemathesis.openapi.from_url(
        f"{base_url}/schema/openapi.json",
        config=config,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


def test_the_server_under_test_applies_the_host_and_origin_rules(base_url: str) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base_url, headers=bearer, timeout=10) as client:
        assert client.get("/v1/files", headers={"Host": "evil.example"}).status_code == 421
        evil = {"Origin": "http://evil.example", "Content-Type": "text/csv"}
        assert client.post("/v1/files", headers=evil, content=b"").status_code == 403
        assert client.get("/v1/files").status_code == 200


def test_the_schema_has_every_operation() -> None:
    assert len({label for label, _ in CASES}) == 17


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_operation_conforms_to_the_schema(
    api_schema: OpenApiSchema, label: str, mode: GenerationMode
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case[Any]) -> None:
        response = case.call_and_validate()
        if mode is GenerationMode.POSITIVE:  # valid requests carry the token
            assert response.status_code != 401, response.text

    run()
