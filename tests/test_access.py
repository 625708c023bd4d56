"""API tokens and Idempotency-Key on the real app over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.app import build_app
from daemon.testing import pipeline_settings

CSV = b"S. No.,Product Name,Input Image Urls\n1,Shoe,http://img.example/a.jpg\n"
RAW = {"Content-Type": "text/csv"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    settings = pipeline_settings(tmp_path, server={"tokens": ("alpha-token", "beta-token")},
                                 download={"attempts": 1})
    async with TestClient(TestServer(build_app(settings))) as c:
        yield c


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "alpha-token"},
                                     {"Authorization": "Basic alpha-token"}])
async def test_endpoints_need_a_valid_token(client: TestClient, headers: dict[str, str]) -> None:  # type: ignore[type-arg]
    """Without a valid bearer token every endpoint but /healthz answers 401 JSON."""
    for method, path in (("POST", "/upload"), ("GET", "/status/x"), ("GET", "/export"), ("GET", "/images/a.jpg"),
                         ("POST", "/webhook"), ("POST", "/redeliver/x")):
        response = await client.request(method, path, headers={**RAW, **headers}, data=CSV)
        assert response.status == 401, path
        assert (await response.json())["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await client.get("/healthz")).status == 200


async def test_a_token_that_is_not_utf8_is_refused_with_401(client: TestClient) -> None:  # type: ignore[type-arg]
    """An Authorization header whose bytes are not UTF-8 is a wrong token (401), not a 500."""
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"GET /status/x HTTP/1.1\r\nHost: imgpipe\r\nAuthorization: Bearer \xff\xfe\r\n"
                 b"Connection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b'"error": "unauthorized"' in answer


async def test_any_configured_token_is_accepted(client: TestClient) -> None:  # type: ignore[type-arg]
    """Each configured token opens the API."""
    for token in ("alpha-token", "beta-token"):
        response = await client.post("/upload", data=CSV, headers={**RAW, "Authorization": f"Bearer {token}"})
        assert response.status == 202


async def test_idempotency_key_replays_and_refuses_a_different_body(tmp_path: Path) -> None:
    """The same key and body return the same request and create nothing; another body with that key gets 422."""
    async with TestClient(TestServer(build_app(pipeline_settings(tmp_path)))) as client:
        headers = {**RAW, "Idempotency-Key": "order-42"}
        first = await client.post("/upload", data=CSV, headers=headers)
        second = await client.post("/upload", data=CSV, headers=headers)
        other = await client.post("/upload", data=CSV.replace(b"Shoe", b"Boot"), headers=headers)
        fresh = await client.post("/upload", data=CSV, headers={**RAW, "Idempotency-Key": "order-43"})
        first_body, second_body, other_body = await first.json(), await second.json(), await other.json()
        fresh_body = await fresh.json()
        export = await client.get(f"/status/{first_body['request_id']}")
        assert export.status == 200
    assert first.status == 202 and second.status == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second_body["request_id"] == first_body["request_id"] and second_body["images"] == 1
    assert other.status == 422 and other_body["error"] == "idempotency_key_reused"
    assert other_body["request_id"] == first_body["request_id"]
    assert fresh.status == 202 and fresh_body["request_id"] != first_body["request_id"]


@pytest.mark.parametrize("body, content_type", [
    (b"x", "multipart/form-data"),
    (b"garbage without any boundary", "multipart/form-data; boundary=abc"),
])
async def test_malformed_multipart_is_a_400(tmp_path: Path, body: bytes, content_type: str) -> None:
    """A broken multipart body answers 400 invalid_multipart, not a 500."""
    async with TestClient(TestServer(build_app(pipeline_settings(tmp_path)))) as client:
        response = await client.post("/upload", data=body, headers={"Content-Type": content_type})
        payload = await response.json()
    assert response.status == 400 and payload["error"] == "invalid_multipart"


@pytest.mark.parametrize(("tokens", "cache_control"), [(("alpha-token",), "private, max-age=86400"),
                                                       ((), "public, max-age=86400")])
async def test_images_behind_tokens_are_not_for_shared_caches(tmp_path: Path, tokens: tuple[str, ...],
                                                               cache_control: str) -> None:
    """With API tokens an image is served `private`, so a caching proxy in front cannot hand it to callers without
    a token; without tokens it is `public`."""
    settings = pipeline_settings(tmp_path, server={"tokens": tokens})
    async with TestClient(TestServer(build_app(settings))) as c:
        (settings.path("images") / "r_1_0.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG")
        headers = {"Authorization": "Bearer alpha-token"} if tokens else {}
        response = await c.get("/images/r_1_0.jpg", headers=headers)
        assert response.status == 200 and await response.read() == b"\xff\xd8\xff\xe0 a JPEG"
        assert response.headers["Cache-Control"] == cache_control
