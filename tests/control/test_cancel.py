"""POST /cancel/<id>: downloads in flight are dropped, no more start, the request ends `cancelled`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from daemon.config import Settings
from daemon.events import ImageFailed
from daemon.http_api import EVENTLOG
from daemon.replay import replay
from daemon.stages.download import DownloadStage
from daemon.testing import Listener, Origin, eventually


async def test_cancel_stops_a_request_and_keeps_what_was_compressed(
        make_settings: Callable[..., Settings], serve_daemon: Any, origin: Origin, helpers: Any) -> None:
    """A cancelled request stops downloading at once, ends `cancelled` everywhere, and its compressed image stays."""
    settings = make_settings(download={"total_timeout": 60.0, "concurrency": 2, "backlog": 4})
    async with Listener([200]) as listener:
        async with serve_daemon(settings) as daemon:
            request_id = await daemon.upload([f"{origin.url}/img/photo.jpg"],
                                             *[[f"{origin.url}/stall?n={n}"] for n in range(6)],
                                             webhook_url=listener.url)

            async def photo_done_and_two_stalled() -> bool:
                status = await daemon.status(request_id)
                return status["progress"]["done"] == 1 and origin.hits["/stall"] == 2

            await eventually(photo_done_and_two_stalled, "the photo compressed and two downloads hanging")
            response = await daemon.client.post(f"/cancel/{request_id}")
            assert response.status == 200, await response.text()
            answer = await response.json()
            status = await daemon.status(request_id)
            await daemon.idle(DownloadStage)
            photo = status["products"][0]["images"][0]
            served = await daemon.client.get("/images/" + photo["output_url"].rsplit("/", 1)[1])
            export = await daemon.client.get(f"/export/{request_id}")
            export_text = await export.text()
            again = await daemon.client.post(f"/cancel/{request_id}")
            retried = await daemon.client.post(f"/retry/{request_id}")
            refusals = [(r.status, (await r.json())["error"]) for r in (again, retried)]
            await listener.wait_for(1)
        async with serve_daemon(settings) as daemon:  # a restart does not bring the request back to life
            await daemon.idle(DownloadStage)
            after_restart = await daemon.status(request_id)
    assert answer["status"] == "cancelled"
    assert status["status"] == "cancelled" and status["completed_at"]
    assert status["progress"] == {"images": 7, "done": 1, "failed": 0, "pending": 0, "cancelled": 6}
    assert [p["images"][0]["status"] for p in status["products"]] == ["compressed"] + ["cancelled"] * 6
    assert origin.hits["/stall"] == 2  # the two in flight were dropped, the other four never started
    assert served.status == 200
    assert export.status == 200 and export_text.count("/images/") == 1
    assert (settings.path("outbox") / f"{request_id}.csv").exists()
    assert refusals == [(409, "already_finished"), (409, "cancelled")]
    message = json.loads(listener.received[0].body)
    assert (message["type"], message["data"]["status"]) == ("request.completed", "cancelled")
    assert after_restart["status"] == "cancelled" and origin.hits["/stall"] == 2
    before = helpers.query(settings, "SELECT status, done, failed FROM view_status_requests")
    await replay(settings)
    assert helpers.query(settings, "SELECT status, done, failed FROM view_status_requests") == before


async def test_cancel_of_an_unknown_or_finished_request_is_refused(
        make_settings: Callable[..., Settings], serve_daemon: Any, origin: Origin) -> None:
    """POST /cancel answers 404 for an unknown id and 409 for a request that has finished."""
    async with serve_daemon(make_settings()) as daemon:
        request_id = await daemon.upload([f"{origin.url}/img/photo.jpg"])
        await daemon.finished(request_id)
        finished = await daemon.client.post(f"/cancel/{request_id}")
        unknown = await daemon.client.post("/cancel/nope")
        answers = [(r.status, await r.json()) for r in (finished, unknown)]
    assert [(code, body["error"]) for code, body in answers] == [(409, "already_finished"), (404, "unknown_request")]
    assert "completed" in answers[0][1]["message"]


async def test_cancel_goes_through_while_image_events_keep_landing(
        make_settings: Callable[..., Settings], serve_daemon: Any, origin: Origin) -> None:
    """A busy request is cancelled at once, however many image events land while the cancellation is decided."""
    settings = make_settings(download={"total_timeout": 60.0, "concurrency": 1})
    async with serve_daemon(settings) as daemon:
        request_id = await daemon.upload(*[[f"{origin.url}/stall?n={n}"] for n in range(3)])

        async def hanging() -> bool:
            return origin.hits["/stall"] == 1

        await eventually(hanging, "a download hanging")
        eventlog = daemon.app[EVENTLOG]
        read = eventlog.query

        async def read_then_an_image_event_lands(fn: Any, *args: Any) -> Any:
            result = await read(fn, *args)
            # A type the other commands read (they need the failed images), not one cancellation needs.
            await eventlog.append(request_id, [ImageFailed(product=2, index=0, stage="download", error="gone")])
            return result

        eventlog.query = read_then_an_image_event_lands
        response = await daemon.client.post(f"/cancel/{request_id}")
        eventlog.query = read
        assert response.status == 200, await response.text()
        status = await eventually(lambda: _finished(daemon, request_id), "the request finished")
    assert status["status"] == "cancelled"


async def _finished(daemon: Any, request_id: str) -> dict[str, Any] | None:
    status: dict[str, Any] = await daemon.status(request_id)
    return status if status["status"] == "cancelled" else None
