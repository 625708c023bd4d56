"""The OpenAPI description stays true: every route the app registers is described, and nothing else."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from aiohttp.test_utils import TestClient, TestServer

from daemon.app import build_app
from daemon.openapi import DESCRIPTION
from daemon.testing import pipeline_settings


def test_every_route_is_described_and_every_description_is_a_route(tmp_path: Path) -> None:
    """The app's routes (method and pattern; HEAD comes with GET) are exactly the description's operations."""
    app = build_app(pipeline_settings(tmp_path))
    routes = {(route.resource.canonical, route.method.lower()) for route in app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    described = {(path, method) for path, operations in DESCRIPTION["paths"].items() for method in operations}
    assert not routes - described, f"routes without a description in daemon/openapi.py: {sorted(routes - described)}"
    assert not described - routes, f"described operations without a route: {sorted(described - routes)}"


def test_the_description_is_valid_openapi_and_every_operation_names_its_answers() -> None:
    """Schemathesis loads it as OpenAPI 3.1, and every operation lists its 2xx and error answers."""
    schema = schemathesis.openapi.from_dict(DESCRIPTION)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = list(schema.get_all_operations())
    assert len(operations) == sum(len(ops) for ops in DESCRIPTION["paths"].values())
    for path, ops in DESCRIPTION["paths"].items():
        for method, operation in ops.items():
            codes = set(operation["responses"])
            assert any(code.startswith("2") for code in codes), (method, path)
            assert operation.get("security") == [] or "401" in codes, (method, path)  # [] : needs no token


async def test_served_at_openapi_json_behind_the_token(tmp_path: Path) -> None:
    """GET /openapi.json answers the description as JSON, to a caller with a token only when tokens are set."""
    settings = pipeline_settings(tmp_path, server={"tokens": ("t0ken",)})
    async with TestClient(TestServer(build_app(settings))) as client:
        refused = await client.get("/openapi.json")
        assert refused.status == 401
        response = await client.get("/openapi.json", headers={"Authorization": "Bearer t0ken"})
        assert response.status == 200 and response.content_type == "application/json"
        assert await response.json() == DESCRIPTION
