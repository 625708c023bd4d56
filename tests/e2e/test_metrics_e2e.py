"""/metrics of the real daemon after a real batch, read with Prometheus' own parser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from daemon.app import build_app
from daemon.metrics import METRICS
from daemon.testing import Listener, Origin, eventually, jpeg_bytes, photo, pipeline_settings

TOKEN = "metrics-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def samples(text: str) -> Iterator[Sample]:
    for family in text_string_to_metric_families(text):
        yield from family.samples


def value(text: str, name: str, **labels: str) -> float:
    """The one sample called `name` with exactly these labels."""
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def scrape(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(f"{base_url}/metrics", headers=AUTH) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


async def test_metrics_count_a_batch(launch_daemon: Any, tmp_path: Path, database_url: str) -> None:
    """After a batch of one compressed, one kept and one failed image with a webhook, every count matches it."""
    files = {"photo.jpg": jpeg_bytes(photo(640, 480, seed=21)), "low.jpg": jpeg_bytes(photo(640, 480, seed=22), 30)}
    async with (Origin(files) as origin, Listener() as listener, aiohttp.ClientSession() as session):
        with launch_daemon(tmp_path, database_url, IMGPIPE_SERVER_TOKENS=TOKEN) as daemon:
            async with session.get(f"{daemon.base_url}/metrics") as refused:
                assert refused.status == 401  # as protected as the rest of the API
            async with session.get(f"{daemon.base_url}/no/such/path", headers=AUTH) as unknown:
                assert unknown.status == 404
            csv_text = ("S. No.,Product Name,Input Image Urls\n"
                        f'1,Lamp,"{origin.url}/img/photo.jpg,{origin.url}/img/low.jpg"\n'
                        f"2,Desk,{origin.url}/code/404\n")
            async with session.post(f"{daemon.base_url}/upload", data=csv_text.encode(), headers={
                    **AUTH, "Content-Type": "text/csv"}, params={"webhook_url": listener.url}) as response:
                assert response.status == 202, await response.text()
                request_id = (await response.json())["request_id"]

            async def finished() -> dict[str, Any] | None:
                async with session.get(f"{daemon.base_url}/status/{request_id}", headers=AUTH) as response:
                    body: dict[str, Any] = await response.json()
                return body if body["status"] == "completed_with_errors" else None

            status = await eventually(finished, "the request to complete with errors")
            await listener.wait_for(1)

            async def settled() -> str | None:  # the delivery is counted once the daemon has its answer
                text = await scrape(session, daemon.base_url)
                lagging = [s for s in samples(text) if s.name == "imgpipe_consumer_lag_events" and s.value]
                delivered = value(text, "imgpipe_webhook_deliveries_total", outcome="delivered")
                return text if delivered == 1 and not lagging else None

            text = await eventually(settled, "the delivery counted and every consumer caught up")

    images = [image for product in status["products"] for image in product["images"]]
    done = [image for image in images if image["status"] != "failed"]
    assert value(text, "imgpipe_images_total", outcome="compressed") == 1
    assert value(text, "imgpipe_images_total", outcome="kept") == 1
    assert value(text, "imgpipe_images_total", outcome="failed") == 1
    assert value(text, "imgpipe_image_in_bytes_total") == sum(image["bytes_in"] for image in done)
    assert value(text, "imgpipe_image_out_bytes_total") == sum(image["bytes_out"] for image in done)
    assert value(text, "imgpipe_download_duration_seconds_count") == 3  # the 404 is not tried again
    assert value(text, "imgpipe_compress_duration_seconds_count") == 2
    assert value(text, "imgpipe_queue_wait_seconds_count", stage="download") == 3
    assert value(text, "imgpipe_queue_wait_seconds_count", stage="compress") == 2
    assert value(text, "imgpipe_images_in_flight", stage="download") == 0
    assert value(text, "imgpipe_images_in_flight", stage="compress") == 0
    assert value(text, "imgpipe_download_backlog_images") == 0
    consumers = {s.labels["consumer"] for s in samples(text) if s.name == "imgpipe_consumer_lag_events"}
    assert {"view.status", "stage.download", "stage.compress", "webhooks.deliver"} <= consumers
    assert value(text, "imgpipe_http_requests_total", method="POST", route="/upload", status="202") == 1
    assert value(text, "imgpipe_http_requests_total", method="GET", route="/metrics", status="401") == 1
    assert value(text, "imgpipe_http_requests_total", method="GET", route="/status/{request_id}", status="200") >= 1
    assert value(text, "imgpipe_process_start_time_seconds") > 0
    assert not [s.name for s in samples(text) if s.name.endswith("_created")]  # no series per counter's birth
    assert value(text, "imgpipe_http_requests_total", method="GET", route="unmatched", status="404") == 1
    routes = {s.labels["route"] for s in samples(text) if s.name == "imgpipe_http_requests_total"}
    assert not any(request_id in route for route in routes)  # patterns, never raw paths


async def test_each_app_counts_on_its_own(tmp_path: Path) -> None:
    """Two apps in one process keep separate registries: a request to one is not counted by the other."""
    first, second = (build_app(pipeline_settings(tmp_path / name)) for name in ("a", "b"))
    first[METRICS].http_requests.labels("GET", "/healthz", "200").inc()
    text = (await second[METRICS].exposition()).decode()
    assert not [s for s in samples(text) if s.name == "imgpipe_http_requests_total"]
