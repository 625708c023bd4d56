"""End to end: the daemon as a real process, used the way an operator does (HTTP, inbox folder, CLI, logs)."""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from daemon.testing import Origin, eventually, jpeg_bytes, photo

T = TypeVar("T")
SAMPLE_CSV = Path(__file__).resolve().parents[2] / "sample.csv"
DOCUMENTED_KEYS = {"request_id", "status", "source", "created_at", "updated_at", "completed_at", "progress",
                   "products"}
STATUSES = {"queued", "processing", "completed", "completed_with_errors", "failed"}
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def wait_until(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def assert_status_shape(status: dict[str, Any]) -> None:
    """The documented GET /status body."""
    assert DOCUMENTED_KEYS <= set(status)
    assert status["status"] in STATUSES
    assert set(status["source"]) == {"kind", "name"}
    assert set(status["progress"]) == {"images", "done", "failed", "pending"}
    progress = status["progress"]
    assert progress["done"] + progress["failed"] + progress["pending"] == progress["images"]
    for product in status["products"]:
        assert {"serial", "product_name", "images"} <= set(product)
        for image in product["images"]:
            assert {"input_url", "status"} <= set(image)


async def test_upload_sample_csv_then_get_its_status(daemon: Any) -> None:
    """Uploading sample.csv as multipart answers 202, and the status URL it gives answers with the request."""
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("file", SAMPLE_CSV.read_bytes(), filename="sample.csv", content_type="text/csv")
        async with session.post(f"{daemon.base_url}/upload", data=form) as response:
            assert response.status == 202
            body = await response.json()
        assert body["status_url"] == f"{daemon.base_url}/status/{body['request_id']}"
        assert (body["products"], body["images"]) == (2, 6)
        async with session.get(body["status_url"]) as response:
            assert response.status == 200
            status = await response.json()
    assert_status_shape(status)
    assert status["request_id"] == body["request_id"]
    assert status["source"] == {"kind": "upload", "name": "sample.csv"}
    assert status["progress"]["images"] == 6
    assert [(p["serial"], p["product_name"], len(p["images"])) for p in status["products"]] == [
        ("1", "SKU1", 3), ("2", "SKU2", 3)]


async def test_csv_dropped_in_the_inbox_is_archived_processed_and_exported(daemon: Any, tmp_path: Path) -> None:
    """A CSV moved into the inbox is archived under its request id, its status answers, and it completes."""
    images = {"a.jpg": jpeg_bytes(photo(320, 240, seed=1)), "b.jpg": jpeg_bytes(photo(320, 240, seed=2))}
    async with Origin(images) as origin, aiohttp.ClientSession() as session:
        data = (f"S. No.,Product Name,Input Image Urls\n"
                f'1,Lamp,"{origin.url}/img/a.jpg,{origin.url}/img/b.jpg"\n'
                f"2,Desk,{origin.url}/img/b.jpg\n")
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / "drop.csv").write_text(data, encoding="utf-8")
        os.rename(staging / "drop.csv", daemon.inbox / "drop.csv")

        async def archived() -> list[Path]:
            return sorted(daemon.archive.glob("*--drop.csv"))

        (path,) = await eventually(archived, "drop.csv to appear in inbox/archive")
        request_id = path.name.partition("--")[0]
        assert REQUEST_ID.match(request_id)
        assert path.read_text(encoding="utf-8") == data

        async def status_when(done: bool) -> dict[str, Any] | None:
            async with session.get(f"{daemon.base_url}/status/{request_id}") as response:
                if response.status != 200:
                    return None
                body = await response.json()
                return body if not done or body["completed_at"] else None

        first = await eventually(lambda: status_when(False), f"GET /status/{request_id} to answer 200")
        assert_status_shape(first)
        assert first["source"] == {"kind": "inbox", "name": "drop.csv"}
        final = await eventually(lambda: status_when(True), f"request {request_id} to complete")
        assert_status_shape(final)
        assert final["status"] == "completed", final
        assert final["progress"] == {"images": 3, "done": 3, "failed": 0, "pending": 0}
        outputs = [image["output_url"] for product in final["products"] for image in product["images"]]
        for url in outputs:
            assert url.startswith(f"{daemon.base_url}/images/")
            async with session.get(url) as response:
                assert response.status == 200
                assert response.content_type.startswith("image/")
        outbox_file = daemon.outbox / f"{request_id}--drop.csv"

        async def exported() -> bool:
            return outbox_file.exists()

        await eventually(exported, f"{outbox_file.name} in the outbox")
    rows = list(csv.reader(io.StringIO(outbox_file.read_text(encoding="utf-8"))))
    assert rows[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    assert [(r[0], r[1], r[3].split(",")) for r in rows[1:]] == [("1", "Lamp", outputs[:2]), ("2", "Desk", outputs[2:])]


def test_cli_submit_prints_the_request_id_and_status_json_prints_its_json(daemon: Any, tmp_path: Path) -> None:
    """`imgpipe submit FILE` prints the new request id (the request named after the file); `imgpipe status ID --json`
    prints that request as JSON; a file that cannot be read is a one-line error."""
    named = tmp_path / "caf\u00e9 batch.csv"
    named.write_bytes(SAMPLE_CSV.read_bytes())
    submitted = daemon.cli("--config", str(daemon.client_config), "submit", str(named))
    assert submitted.returncode == 0, submitted.stderr
    request_id = submitted.stdout.strip()
    assert REQUEST_ID.match(request_id), submitted.stdout

    by_env = {"IMGPIPE_SERVER_PORT": str(daemon.port)}  # the other way to find the daemon: the environment
    shown = daemon.cli("status", request_id, "--json", env=by_env)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert_status_shape(status)
    assert (status["request_id"], status["source"]) == (request_id, {"kind": "upload", "name": "caf\u00e9 batch.csv"})

    missing = daemon.cli("--config", str(daemon.client_config), "submit", str(tmp_path / "nowhere.csv"))
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == f"imgpipe: cannot read {tmp_path / 'nowhere.csv'}: No such file or directory\n"

    unknown = daemon.cli("status", "f" * 32, env=by_env)
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout)["error"] == "unknown_request"

    bad = tmp_path / "bad.csv"
    bad.write_text("S. No.,Product Name,Input Image Urls\n1,,ftp://x.example/1.jpg\n", encoding="utf-8")
    refused = daemon.cli("submit", str(bad), "--config", str(daemon.client_config))
    assert refused.returncode == 1
    assert refused.stdout == ""
    error = json.loads(refused.stderr)
    assert error["error"] == "invalid_csv"
    assert [(p["line"], p["column"]) for p in error["problems"]] == [(2, "Product Name"), (2, "Input Image Urls")]


class ProxyErrorPage(http.server.BaseHTTPRequestHandler):
    """A reverse proxy in front of a daemon that is down: 502 with an HTML page."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


def test_cli_reports_an_answer_that_is_not_json_in_one_line(daemon: Any) -> None:
    """`imgpipe status` through a proxy answering an HTML 502 prints one line naming the status, not a traceback."""
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ProxyErrorPage)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        shown = daemon.cli("status", "f" * 32, env={"IMGPIPE_SERVER_PUBLIC_URL": url})
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()
    assert (shown.returncode, shown.stdout) == (1, "")
    assert shown.stderr == (f"imgpipe: {url} answered HTTP 502 that is not the daemon's JSON: "
                            "<html><body><h1>502 Bad Gateway</h1></body></html>\n")


def test_daemon_logs_json_lines_to_stdout(daemon: Any) -> None:
    """Every stdout line of the daemon is a JSON object with an `event`; start-up and each accepted CSV are logged."""
    request = urllib.request.Request(f"{daemon.base_url}/upload", data=SAMPLE_CSV.read_bytes(), method="POST",
                                     headers={"Content-Type": "text/csv"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        request_id = json.loads(response.read())["request_id"]

    def accepted() -> list[dict[str, Any]]:
        return [e for e in daemon.log_lines() if e["event"] == "csv_accepted" and e.get("request_id") == request_id]

    (entry,) = wait_until(accepted, "a csv_accepted log line for the upload")
    assert (entry["source"], entry["products"], entry["images"]) == ("upload", 2, 6)
    assert entry["level"] == "info"
    assert "timestamp" in entry
    started = [e for e in daemon.log_lines() if e["event"] == "daemon_started"]
    assert [e["url"] for e in started] == [daemon.base_url]
    assert started[0]["inbox"] == str(daemon.inbox)
