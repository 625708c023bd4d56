"""GET /requests and the GET /events stream on the whole daemon, with a real image origin."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from daemon.testing import Origin


async def listing(served: Any, query: str = "") -> dict[str, Any]:
    response = await served.client.get(f"/requests{query}")
    assert response.status == 200, await response.text()
    return dict(await response.json())


async def test_requests_are_listed_newest_first_a_page_at_a_time(serve: Callable[..., Any], origin: Origin) -> None:
    """Three requests come back newest first, two per page, linked by the `next` cursor, with their sizes."""
    async with serve() as served:
        first = await served.upload(("Shoe", [f"{origin.url}/img/p0.jpg", f"{origin.url}/img/p1.jpg"]))
        second = await served.upload(("Hat", [f"{origin.url}/code/404"]))
        third = await served.upload(("Bag", [f"{origin.url}/img/p2.jpg"]))
        statuses = [await served.finished(rid) for rid in (first, second, third)]
        page = await listing(served, "?limit=2")
        assert [r["request_id"] for r in page["requests"]] == [third, second]
        rest = await listing(served, f"?limit=2&before={page['next']}")
        assert [r["request_id"] for r in rest["requests"]] == [first]
        assert rest["next"] is None
        shoe = rest["requests"][0]
        images = [i for p in statuses[0]["products"] for i in p["images"]]
        assert shoe["status"] == "completed"
        assert shoe["source"] == {"kind": "upload", "name": "catalog.csv"}
        assert shoe["progress"] == {"images": 2, "done": 2, "failed": 0, "pending": 0}
        assert shoe["compression"]["bytes_in"] == sum(i["bytes_in"] for i in images) > 0
        assert shoe["compression"]["bytes_out"] == sum(i["bytes_out"] for i in images) > 0
        assert shoe["compression"] == statuses[0]["compression"]
        assert shoe["completed_at"] == statuses[0]["completed_at"]
        assert page["requests"][0]["compression"] == statuses[2]["compression"]


async def test_requests_filter_by_status(serve: Callable[..., Any], origin: Origin) -> None:
    """`?status=` lists only the requests in that status."""
    async with serve() as served:
        done = await served.upload(("Shoe", [f"{origin.url}/img/p0.jpg"]))
        failed = await served.upload(("Hat", [f"{origin.url}/code/404"]))
        for rid in (done, failed):
            await served.finished(rid)
        failed_status = (await served.finished(failed))["status"]
        assert [r["request_id"] for r in (await listing(served, "?status=completed"))["requests"]] == [done]
        only_failed = (await listing(served, f"?status={failed_status}"))["requests"]
        assert [r["request_id"] for r in only_failed] == [failed]
        assert (await listing(served, "?status=cancelled")) == {"requests": [], "next": None}


@pytest.mark.parametrize(("query", "field"), [
    ("?limit=0", "limit"), ("?limit=101", "limit"), ("?limit=ten", "limit"), ("?status=done", "status"),
    ("?before=not-a-cursor", "before"), ("?before=WzFd", "before"),
])
async def test_bad_list_parameters_answer_400_naming_them(serve: Callable[..., Any], query: str, field: str) -> None:
    """A bad `limit`, `status` or `before` answers 400 JSON naming the parameter and why."""
    async with serve() as served:
        response = await served.client.get(f"/requests{query}")
        body = await response.json()
        assert response.status == 400
        assert body["error"] == "invalid_parameter" and body["field"] == field
        assert field in body["message"]


async def events_until(response: aiohttp.ClientResponse, wanted: Callable[[str, dict[str, Any]], bool]) -> None:
    """Read server-sent events from `response` until one satisfies `wanted`."""
    buffer = b""
    while True:
        chunk = await asyncio.wait_for(response.content.readany(), timeout=30)
        assert chunk, "the event stream ended"
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            lines = block.decode().splitlines()
            kind = next((line[6:].strip() for line in lines if line.startswith("event:")), "")
            data = [line[5:].strip() for line in lines if line.startswith("data:")]
            if data and wanted(kind, json.loads("\n".join(data))):
                return


async def test_the_event_stream_pushes_progress_and_deletion(serve: Callable[..., Any], origin: Origin) -> None:
    """A client of /events sees a request appear, reach completed with its images counted, and be deleted."""
    async with serve() as served:
        async with served.client.get("/events") as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"] == "text/event-stream"
            assert await stream.content.readuntil(b"\n\n") == b": connected\n\n"
            rid = await served.upload(("Shoe", [f"{origin.url}/img/p0.jpg", f"{origin.url}/img/p1.jpg"]))
            await events_until(stream, lambda kind, data: kind == "request" and data["request_id"] == rid
                               and data["status"] == "completed" and data["progress"]["done"] == 2)
            assert (await served.client.delete(f"/requests/{rid}")).status == 200
            await events_until(stream, lambda kind, data: kind == "deleted" and data == {"request_id": rid})


async def test_list_and_events_need_the_token_but_the_page_does_not(serve: Callable[..., Any]) -> None:
    """With tokens, /requests and /events answer 401 without one; the page and its files load without."""
    async with serve(server={"tokens": ("page-token",)}) as served:
        for path in ("/requests", "/events", "/requests/x/images/0/0/original"):
            assert (await served.client.get(path)).status == 401, path
        for path in ("/", "/ui/page.js", "/ui/page.css"):
            assert (await served.client.get(path)).status == 200, path
        response = await served.client.get("/requests", headers={"Authorization": "Bearer page-token"})
        assert response.status == 200
        assert await response.json() == {"requests": [], "next": None}
