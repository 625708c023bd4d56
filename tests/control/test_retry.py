"""POST /retry/<id>: a finished request's failed images get a new round; the good ones are left alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from daemon.config import Settings
from daemon.replay import replay
from daemon.testing import Listener, Origin, jpeg_bytes, photo
from daemon.views.status import StatusView


def images(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [image for product in status["products"] for image in product["images"]]


async def test_retry_downloads_only_the_failed_images_and_completes_again(
        make_settings: Callable[..., Settings], serve_daemon: Any, origin: Origin, helpers: Any,
        monkeypatch: Any) -> None:
    """A failed image is tried again once its origin has it; the request completes again with a new webhook-id."""
    monkeypatch.setattr(StatusView, "batch_window", 1.0)  # a slow view: without waiting for it, /retry would answer early
    settings = make_settings()
    async with Listener([200]) as listener, serve_daemon(settings) as daemon:
        request_id = await daemon.upload([f"{origin.url}/img/photo.jpg", f"{origin.url}/img/late.jpg"],
                                         webhook_url=listener.url)
        first = await daemon.finished(request_id)
        assert first["status"] == "completed_with_errors"
        assert [i["status"] for i in images(first)] == ["compressed", "failed"]
        await listener.wait_for(1)

        origin.files["late.jpg"] = jpeg_bytes(photo(320, 240, seed=9))
        response = await daemon.client.post(f"/retry/{request_id}")
        assert response.status == 202, await response.text()
        assert (await response.json())["round"] == 1
        retrying = await daemon.status(request_id)  # at once: the answer waited for the view
        assert retrying["status"] == "processing" and retrying["completed_at"] is None
        assert retrying["progress"] == {"images": 2, "done": 1, "failed": 0, "pending": 1}
        assert images(retrying)[1]["status"] in ("pending", "downloaded") and images(retrying)[1]["error"] is None

        second = await daemon.finished(request_id)
        await listener.wait_for(2)
        nothing_failed = await daemon.client.post(f"/retry/{request_id}")
        unknown = await daemon.client.post("/retry/nope")
        refusals = [(r.status, (await r.json())["error"]) for r in (nothing_failed, unknown)]
        outbox = (settings.path("outbox") / f"{request_id}.csv").read_text()
    assert second["status"] == "completed" and second["progress"]["done"] == 2
    assert [i["status"] for i in images(second)] == ["compressed", "compressed"]
    assert origin.hits["/img/photo.jpg"] == 1  # the good image was not done again
    assert origin.hits["/img/late.jpg"] == 2
    first_message, second_message = listener.received
    assert first_message.headers["webhook-id"] != second_message.headers["webhook-id"]
    assert json.loads(second_message.body)["data"]["status"] == "completed"
    assert outbox.count("/images/") == 2  # rewritten with both outputs
    assert refusals == [(409, "nothing_failed"), (404, "unknown_request")]
    types = [kind for _, _, _, kind, _ in helpers.stored_events(settings, request_id)]
    assert types.count("RequestRetried") == 1 and types.count("RequestCompleted") == 2
    before = helpers.query(settings, "SELECT status, done, failed FROM view_status_requests")
    await replay(settings)
    assert helpers.query(settings, "SELECT status, done, failed FROM view_status_requests") == before


async def test_a_running_request_is_not_retried(make_settings: Callable[..., Settings], serve_daemon: Any,
                                                origin: Origin) -> None:
    """POST /retry on a request still running answers 409 and changes nothing."""
    settings = make_settings(download={"total_timeout": 30.0})
    async with serve_daemon(settings) as daemon:
        request_id = await daemon.upload([f"{origin.url}/stall"])
        response = await daemon.client.post(f"/retry/{request_id}")
        body = await response.json()
        assert (response.status, body["error"]) == (409, "not_finished")
        assert "still running" in body["message"]
        assert (await daemon.client.post(f"/cancel/{request_id}")).status == 200


async def test_the_cli_retries_and_says_why_not(make_settings: Callable[..., Settings], serve_daemon: Any,
                                                origin: Origin, helpers: Any, tmp_path: Any) -> None:
    """`imgpipe retry ID` prints the daemon's answer and exits 0, or prints the refusal on stderr and exits 1."""
    config = tmp_path / "client.toml"
    async with serve_daemon(make_settings()) as daemon:
        config.write_text(f"[server]\nport = {daemon.client.port}\n")  # the CLI asks the served daemon
        request_id = await daemon.upload([f"{origin.url}/img/missing.jpg"])
        await daemon.finished(request_id)
        done = await asyncio.to_thread(helpers.run_imgpipe, "retry", request_id, "--config", str(config),
                                       cwd=tmp_path)
        refused = await asyncio.to_thread(helpers.run_imgpipe, "retry", "nope", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["round"] == 1
    assert refused.returncode == 1 and json.loads(refused.stderr)["error"] == "unknown_request"
