"""A database written by the previous release (imgpipe 0.1 at ff75e88, schema version 1) is upgraded in place."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from daemon.control import commands
from daemon.eventlog.store import SCHEMA_VERSION
from daemon.http_api import EVENTLOG
from daemon.testing import daemon_app, drain, pipeline_settings
from daemon.views.status import request_status

OLD_DATABASE = Path(__file__).parent / "data" / "written-by-ff75e88.db"
REQUEST_ID = "0a92f7e0a32d4145a3f4d54c4e6df7c7"  # one request: 3 images, 1 failed (a 404)


async def test_a_database_from_the_previous_release_is_upgraded_and_works(tmp_path: Path, helpers: Any) -> None:
    """The old file opens, says its version, keeps its requests and their status, and takes new events."""
    shutil.copy(OLD_DATABASE, tmp_path / "imgpipe.db")
    settings = pipeline_settings(tmp_path)
    with capture_logs() as logs:
        async with daemon_app(settings) as app:
            status = await app[EVENTLOG].query(request_status, REQUEST_ID, settings.public_url)
            position, retried = await commands.retry(app[EVENTLOG], REQUEST_ID)  # new kinds of events go in
            await drain(app)
    assert status is not None and status["status"] == "completed_with_errors"
    assert status["progress"] == {"images": 3, "done": 2, "failed": 1, "pending": 0}
    assert retried.images == ((0, 1),) and position > 0
    assert helpers.query(settings, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert [(e["from_version"], e["to_version"]) for e in logs if e["event"] == "schema_upgraded"] == [
        (1, SCHEMA_VERSION)]
    # Its view tables get the columns added since; images compressed before were not scored.
    assert [e["columns"] for e in logs if e["event"] == "view_columns_added"] == [
        ["view_status_images.quality", "view_status_images.ssim"]]
    images = [image for product in status["products"] for image in product["images"]]
    assert [(image["status"], image["ssim"]) for image in images] == [
        ("compressed", None), ("failed", None), ("compressed", None)]
    assert status["compression"]["scored"] == 0 and status["compression"]["ssim_mean"] is None
