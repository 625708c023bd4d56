"""POST /upload and the read-only endpoints, through a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon.config import Settings, replace
from daemon.stages import requantize, similarity

STATUS_KEYS = {"request_id", "status", "source", "created_at", "updated_at", "completed_at", "progress", "products"}
IMAGE_KEYS = {"input_url", "status", "output_url", "bytes_in", "bytes_out", "width", "height", "format", "attempts",
              "note", "error"}

Serve = Callable[[Settings], AbstractAsyncContextManager[Any]]


@pytest.fixture
def http_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(inbox={"enabled": False})


@pytest.fixture
async def served(serve_app: Serve, http_settings: Settings) -> AsyncIterator[Any]:
    async with serve_app(http_settings) as running:
        yield running


def multipart(data: bytes, filename: str = "batch.csv", field: str = "file", **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(field, data, filename=filename, content_type="text/csv")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


def accepted_logs(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def test_multipart_upload_is_acknowledged_and_its_status_answers_at_once(served: Any, helpers: Any) -> None:
    """Uploading sample.csv answers 202 with the request's counts, and its status_url answers 200 at once."""
    with capture_logs() as logs:
        response = await served.client.post("/upload", data=multipart(helpers.sample_csv.read_bytes(), "sample.csv"))
        assert response.status == 202
        assert response.content_type == "application/json"
        body = await response.json()
    assert set(body) == {"request_id", "status", "products", "images", "status_url"}
    request_id = body["request_id"]
    assert body == {"request_id": request_id, "status": "queued", "products": 2, "images": 6,
                    "status_url": f"http://127.0.0.1:{served.settings.server.port}/status/{request_id}"}
    assert [(e["request_id"], e["source"], e["source_name"], e["products"], e["images"])
            for e in accepted_logs(logs, "csv_accepted")] == [(request_id, "upload", "sample.csv", 2, 6)]
    assert accepted_logs(logs, "csv_rejected") == []

    async with aiohttp.ClientSession() as session, session.get(body["status_url"]) as status_response:
        assert status_response.status == 200
        status = await status_response.json()
    assert STATUS_KEYS <= set(status)
    assert status["request_id"] == request_id
    assert status["status"] == "queued"
    assert status["source"] == {"kind": "upload", "name": "sample.csv"}
    assert status["created_at"] == status["updated_at"]
    assert status["created_at"].endswith("Z")
    assert status["completed_at"] is None
    assert status["progress"] == {"images": 6, "done": 0, "failed": 0, "pending": 6}
    assert [(p["serial"], p["product_name"]) for p in status["products"]] == [("1", "SKU1"), ("2", "SKU2")]
    assert [[i["input_url"] for i in p["images"]] for p in status["products"]] == [
        [f"https://picsum.photos/id/{n}/1200/800.jpg" for n in (10, 11, 12)],
        [f"https://picsum.photos/id/{n}/1200/800.jpg" for n in (13, 14, 15)],
    ]
    for image in (i for p in status["products"] for i in p["images"]):
        assert IMAGE_KEYS <= set(image)
        assert (image["status"], image["output_url"], image["attempts"], image["error"]) == ("pending", None, 0, None)


async def test_upload_records_the_opening_events(served: Any, helpers: Any) -> None:
    """An accepted upload opens one stream: RequestAccepted, then one ImageRequested per URL in CSV order."""
    data = helpers.csv_bytes([("A1", "Alpha", "https://a.example/1.jpg,https://a.example/2.jpg"),
                              ("B2", "Beta", "https://b.example/3.jpg")])
    response = await served.client.post("/upload", data=multipart(data, "two.csv"))
    assert response.status == 202
    request_id = (await response.json())["request_id"]
    events = helpers.stored_events(served.settings)
    assert {stream for _, stream, _, _, _ in events} == {request_id}
    assert [(version, kind) for _, _, version, kind, _ in events] == [
        (1, "RequestAccepted"), (2, "ImageRequested"), (3, "ImageRequested"), (4, "ImageRequested")]
    accepted = events[0][4]
    assert (accepted["source"], accepted["source_name"]) == ("upload", "two.csv")
    assert [p["serial"] for p in accepted["products"]] == ["A1", "B2"]
    assert [(e[4]["product"], e[4]["index"], e[4]["url"]) for e in events[1:]] == [
        (0, 0, "https://a.example/1.jpg"), (0, 1, "https://a.example/2.jpg"), (1, 0, "https://b.example/3.jpg")]


async def test_raw_text_csv_body_is_accepted(served: Any, helpers: Any) -> None:
    """A raw text/csv body is accepted like a multipart file, named upload.csv."""
    response = await served.client.post("/upload", data=helpers.sample_csv.read_bytes(),
                                        headers={"Content-Type": "text/csv; charset=utf-8"})
    assert response.status == 202
    body = await response.json()
    assert (body["products"], body["images"]) == (2, 6)
    status = (await served.status(body["request_id"]))[1]
    assert status["source"] == {"kind": "upload", "name": "upload.csv"}


async def test_a_file_name_that_is_not_utf8_is_kept_with_replacement_characters(served: Any, helpers: Any) -> None:
    """A multipart file named in Latin-1 (as some Windows clients send it) is accepted, and its name is shown with
    U+FFFD for the byte that is not UTF-8 (it used to answer 500: the name could not be stored)."""
    boundary = "imgpipe-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
            + "März.csv".encode("latin-1") + b'"\r\nContent-Type: text/csv\r\n\r\n'
            + helpers.sample_csv.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    response = await served.client.post("/upload", data=body,
                                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status == 202, await response.text()
    status = (await served.status((await response.json())["request_id"]))[1]
    assert status["source"] == {"kind": "upload", "name": "M\ufffdrz.csv"}


async def test_invalid_csv_is_rejected_with_every_problem_and_leaves_nothing_behind(served: Any,
                                                                                    helpers: Any) -> None:
    """An invalid CSV answers 400 invalid_csv listing every problem, and records no event or request."""
    data = helpers.csv_bytes([("1", "SKU1", "ftp://a.example/1.jpg"), ("1", "", "https://a.example/2.jpg")])
    with capture_logs() as logs:
        response = await served.client.post("/upload", data=multipart(data, "bad.csv"))
    assert response.status == 400
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "message", "problems"}
    assert body["error"] == "invalid_csv"
    assert "bad.csv" in body["message"]
    assert [(p["line"], p["column"]) for p in body["problems"]] == [
        (2, "Input Image Urls"), (3, "S. No."), (3, "Product Name")]
    assert all(set(p) == {"line", "column", "reason"} and p["reason"] for p in body["problems"])
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(0,)]
    assert helpers.query(served.settings, "SELECT count(*) FROM view_status_requests") == [(0,)]
    rejected = accepted_logs(logs, "csv_rejected")
    assert [(e["source"], e["source_name"], e["problems"]) for e in rejected] == [("upload", "bad.csv", 3)]
    assert accepted_logs(logs, "csv_accepted") == []


async def test_too_large_bodies_answer_413_json(serve_app: Serve, http_settings: Settings, helpers: Any) -> None:
    """A body over max_upload_bytes answers 413 JSON, whether the size is declared or only found while reading."""
    settings = replace(http_settings, limits={"max_upload_bytes": 1000})
    rows = helpers.batch_rows(40)
    async with serve_app(settings) as served:
        slightly = helpers.csv_bytes(rows)  # over the limit, under the Content-Length shortcut
        assert 1000 < len(slightly) < 1000 + 4 * 8192
        far = helpers.csv_bytes(helpers.batch_rows(2000))
        assert len(far) > 1000 + 4 * 8192
        for data in (slightly, far):
            for kwargs in ({"data": data, "headers": {"Content-Type": "text/csv"}},
                           {"data": multipart(data)}):
                response = await served.client.post("/upload", **kwargs)
                assert response.status == 413, await response.text()
                assert response.content_type == "application/json"
                body = await response.json()
                assert body["error"] == "too_large"
                assert body["limit"] == 1000
                assert "1000 bytes" in body["message"]
        assert helpers.query(settings, "SELECT count(*) FROM events") == [(0,)]
        small = await served.client.post("/upload", data=helpers.csv_bytes(rows[:3]),
                                          headers={"Content-Type": "text/csv"})
        assert small.status == 202


async def test_a_body_whose_content_encoding_does_not_decode_answers_400_json(served: Any, helpers: Any) -> None:
    """A CSV declared gzip or deflate whose bytes are not, to /upload or /webhook, answers 400 invalid_body as JSON
    and records nothing."""
    for path, content_type in (("/upload", "text/csv"), ("/webhook", "application/json")):
        for encoding in ("gzip", "deflate"):
            with capture_logs() as logs:
                response = await served.client.post(path, data=b"S. No.,Product Name,not compressed at all",
                                                    headers={"Content-Type": content_type,
                                                             "Content-Encoding": encoding})
            assert response.status == 400, (path, encoding, await response.text())
            body = await response.json()
            assert body["error"] == "invalid_body"
            assert body["message"] == f"the request body cannot be read: Can not decode content-encoding: {encoding}"
            assert [e for e in logs if e["log_level"] == "error"] == []
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(0,)]


async def test_unsupported_content_type_answers_415_json(served: Any, helpers: Any) -> None:
    """A JSON body answers 415 with a JSON error that says how to send the CSV."""
    response = await served.client.post("/upload", data=b'{"csv": "no"}', headers={"Content-Type": "application/json"})
    assert response.status == 415
    body = await response.json()
    assert body["error"] == "unsupported_media_type"
    assert "multipart/form-data" in body["message"]


async def test_multipart_without_a_file_field_answers_400(served: Any, helpers: Any) -> None:
    """A multipart form whose CSV is not in the `file` field answers 400 missing_file."""
    response = await served.client.post("/upload", data=multipart(helpers.sample_csv.read_bytes(), field="csv"))
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "missing_file"
    assert "file=@" in body["message"]
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(0,)]


async def test_a_multipart_part_with_a_header_that_does_not_parse_answers_400(served: Any, helpers: Any) -> None:
    """A part whose header holds a control character (found by fuzzing: it answered 500) answers 400
    invalid_multipart and accepts nothing."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"x\x11y\"\r\n\r\n[]\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--b--\r\n")
    response = await served.client.post("/upload", data=body,
                                         headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_multipart"
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(0,)]


async def test_invalid_webhook_url_answers_400_naming_the_field(served: Any, helpers: Any) -> None:
    """A webhook_url form field that is not an http(s) URL answers 400 and accepts nothing."""
    form = multipart(helpers.sample_csv.read_bytes(), webhook_url="ftp://hooks.example/x")
    response = await served.client.post("/upload", data=form)
    assert response.status == 400
    body = await response.json()
    assert (body["error"], body["field"]) == ("invalid_webhook_url", "webhook_url")
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(0,)]


async def test_a_webhook_url_field_counts_however_many_fields_come_before_it(served: Any, helpers: Any) -> None:
    """webhook_url is read even after five other form fields (it used to be dropped after four, silently): here its
    internal host is refused, which shows it was read."""
    others = {f"extra{i}": "x" for i in range(5)}
    response = await served.client.post("/upload", data=multipart(helpers.sample_csv.read_bytes(), **others,
                                                                  webhook_url="http://10.1.2.3/hook"))
    body = await response.json()
    assert response.status == 400 and (body["error"], body["field"]) == ("invalid_webhook_url", "webhook_url")
    assert "10.1.2.3, a private address" in body["message"]


async def test_an_oversized_form_field_is_named_in_the_413(served: Any, helpers: Any) -> None:
    """A 9 KB webhook_url field answers 413 naming that field and its limit, not the CSV's."""
    response = await served.client.post("/upload", data=multipart(helpers.sample_csv.read_bytes(),
                                                                  webhook_url="https://h.example/" + "x" * 9000))
    body = await response.json()
    assert response.status == 413
    assert body == {"error": "too_large", "message": "form field 'webhook_url' is larger than 8192 bytes",
                    "field": "webhook_url", "limit": 8192}
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(0,)]


LOOPBACK_REFUSAL = "a loopback address (set [network] allow_private = true or list it in [network] allow)"


@pytest.mark.parametrize(("where", "url", "reason"), [
    ("query", "http://127.0.0.1:8080/hook", f"refused to connect: 127.0.0.1, {LOOPBACK_REFUSAL}"),
    ("form", "http://[::1]:8080/hook", f"refused to connect: ::1, {LOOPBACK_REFUSAL}"),
    ("form", "http://10.1.2.3/hook", "refused to connect: 10.1.2.3, a private address"),
    ("query", "http://localhost:8080/hook", f"refused to connect: localhost resolves to 127.0.0.1, {LOOPBACK_REFUSAL}"),
    ("form", "http://hooks.localhost./x", "refused to connect: hooks.localhost resolves to 127.0.0.1, a loopback"),
])
async def test_a_webhook_url_on_an_internal_host_answers_400_naming_the_field(
        served: Any, helpers: Any, where: str, url: str, reason: str) -> None:
    """With allow_private off, a webhook_url (query or form) naming a blocked literal address or a localhost name
    answers 400 with the reason, and accepts nothing."""
    fields = {"webhook_url": url} if where == "form" else {}
    response = await served.client.post("/upload", data=multipart(helpers.sample_csv.read_bytes(), **fields),
                                        params={"webhook_url": url} if where == "query" else {})
    body = await response.json()
    assert response.status == 400
    assert (body["error"], body["field"]) == ("invalid_webhook_url", "webhook_url")
    assert body["message"].startswith(f"webhook_url: {reason}")
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(0,)]


async def test_a_webhook_url_on_a_public_host_or_allowed_private_one_is_accepted(
        serve_app: Serve, http_settings: Settings, helpers: Any) -> None:
    """A webhook_url naming a public address or a host name is accepted, and a loopback one is with
    allow_private on."""
    async with serve_app(http_settings) as served:
        for url in ("http://93.184.216.34/hook", "https://hooks.example.com/x"):
            response = await served.client.post("/upload", data=multipart(helpers.sample_csv.read_bytes(),
                                                                          webhook_url=url))
            assert response.status == 202, await response.text()
    async with serve_app(replace(http_settings, network={"allow_private": True})) as served:
        response = await served.client.post("/upload", data=multipart(helpers.sample_csv.read_bytes()),
                                            params={"webhook_url": "http://127.0.0.1:8080/hook"})
        assert response.status == 202, await response.text()
    accepted = [data["webhook_url"] for _, _, _, kind, data in helpers.stored_events(http_settings)
                if kind == "RequestAccepted"]
    assert accepted == ["http://93.184.216.34/hook", "https://hooks.example.com/x", "http://127.0.0.1:8080/hook"]


async def test_a_webhook_url_given_twice_must_agree(served: Any, helpers: Any) -> None:
    """A webhook_url in both the query and the form answers 400 naming the field when they differ, and is
    accepted once when they are the same."""
    data = helpers.sample_csv.read_bytes()
    differ = await served.client.post("/upload", data=multipart(data, webhook_url="https://a.example/hook"),
                                      params={"webhook_url": "https://b.example/hook"})
    body = await differ.json()
    assert differ.status == 400
    assert (body["error"], body["field"]) == ("invalid_webhook_url", "webhook_url")
    assert body["message"] == ("webhook_url given twice: in the query and in the form, and they differ "
                               "('https://b.example/hook' and 'https://a.example/hook')")
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(0,)]

    same = await served.client.post("/upload", data=multipart(data, webhook_url="https://a.example/hook"),
                                    params={"webhook_url": "https://a.example/hook"})
    assert same.status == 202
    accepted = [d for _, _, _, kind, d in helpers.stored_events(served.settings) if kind == "RequestAccepted"]
    assert [d["webhook_url"] for d in accepted] == ["https://a.example/hook"]


async def test_status_without_products_leaves_out_only_the_products(served: Any, helpers: Any) -> None:
    """GET /status/<id>?products=false answers the same body without its products; another value is a 400."""
    response = await served.client.post("/upload", data=multipart(helpers.sample_csv.read_bytes(), "sample.csv"))
    request_id = (await response.json())["request_id"]
    full = await served.status_when_ready(request_id)
    short = await served.client.get(f"/status/{request_id}", params={"products": "false"})
    assert short.status == 200
    assert await short.json() == {key: value for key, value in full.items() if key != "products"}
    assert len(full["products"]) == 2
    explicit = await served.client.get(f"/status/{request_id}", params={"products": "true"})
    assert await explicit.json() == full
    wrong = await served.client.get(f"/status/{request_id}", params={"products": "some"})
    assert wrong.status == 400
    assert await wrong.json() == {"error": "invalid_parameter", "message": "products must be true or false, got 'some'",
                                  "field": "products"}


async def test_status_pages_through_the_products_in_input_order(served: Any, helpers: Any) -> None:
    """?limit=N answers N products with the total and the next page's URL, which walks the rest in input order and
    ends with next null; a bad offset or limit is a 400 naming it."""
    response = await served.client.post("/upload", data=multipart(helpers.csv_bytes(helpers.batch_rows(5, 2))))
    request_id = (await response.json())["request_id"]
    full = await served.status_when_ready(request_id)
    base = f"http://127.0.0.1:{served.settings.server.port}"
    pages, url = [], f"{base}/status/{request_id}?limit=2"
    while url is not None:
        answer = await served.client.get(url.removeprefix(base))
        assert answer.status == 200
        body = await answer.json()
        assert {key: value for key, value in body.items() if key not in ("products", "page")} == {
            key: value for key, value in full.items() if key != "products"}
        pages.append(body)
        url = body["page"]["next"]
    assert [[p["serial"] for p in body["products"]] for body in pages] == [["1", "2"], ["3", "4"], ["5"]]
    assert [body["page"] for body in pages] == [
        {"offset": 0, "limit": 2, "products_total": 5, "next": f"{base}/status/{request_id}?offset=2&limit=2"},
        {"offset": 2, "limit": 2, "products_total": 5, "next": f"{base}/status/{request_id}?offset=4&limit=2"},
        {"offset": 4, "limit": 2, "products_total": 5, "next": None},
    ]
    assert [p for body in pages for p in body["products"]] == full["products"]
    rest = await (await served.client.get(f"/status/{request_id}", params={"offset": "3"})).json()
    assert [p["serial"] for p in rest["products"]] == ["4", "5"]
    assert rest["page"] == {"offset": 3, "limit": None, "products_total": 5, "next": None}
    for name, value in (("limit", "0"), ("offset", "-1"), ("limit", "two"), ("offset", "\u00b2")):
        wrong = await served.client.get(f"/status/{request_id}", params={name: value})
        assert wrong.status == 400
        error = await wrong.json()
        assert (error["error"], error["field"]) == ("invalid_parameter", name) and name in error["message"]


async def test_unknown_status_id_answers_404_json(served: Any) -> None:
    """GET /status/<unknown id> answers 404 unknown_request as JSON."""
    code, body = await served.status("0123456789abcdef")
    assert code == 404
    assert body["error"] == "unknown_request"
    assert "0123456789abcdef" in body["message"]


async def test_healthz_answers_ok(served: Any) -> None:
    """GET /healthz answers 200 {"status": "ok"}."""
    response = await served.client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_daemon_started_is_logged_with_the_inbox_disabled(serve_app: Serve, http_settings: Settings) -> None:
    """Start-up logs one daemon_started with the public URL, the JPEG path and the SSIM in use even when the inbox is
    disabled."""
    with capture_logs() as logs:
        async with serve_app(http_settings) as served:
            assert (await served.client.get("/healthz")).status == 200
    started = [e for e in logs if e["event"] == "daemon_started"]
    assert [(e["url"], e["inbox"], e["jpeg_fast_path"], e["ssim"]) for e in started] == [
        (http_settings.public_url, None, requantize.available(), "compiled" if similarity.compiled() else "numpy")]


async def test_unknown_route_and_wrong_method_answer_json(served: Any) -> None:
    """An unknown route answers 404 JSON, a wrong method 405 JSON that keeps the Allow header."""
    missing = await served.client.get("/no/such/route")
    assert missing.status == 404
    assert missing.content_type == "application/json"
    assert (await missing.json())["error"] == "not_found"
    wrong = await served.client.get("/upload")
    assert wrong.status == 405
    assert wrong.content_type == "application/json"
    assert (await wrong.json())["error"] == "method_not_allowed"
    assert "POST" in wrong.headers["Allow"]


async def test_ten_thousand_rows_are_acknowledged(served: Any, helpers: Any) -> None:
    """A 10,000-row CSV (two URLs a row) is accepted with 202 and the right counts, and its status answers."""
    data = helpers.csv_bytes(helpers.batch_rows(10_000, urls_per_row=2))
    started = time.perf_counter()
    response = await served.client.post("/upload", data=multipart(data, "big.csv"))
    elapsed = time.perf_counter() - started
    assert response.status == 202
    body = await response.json()
    assert (body["products"], body["images"]) == (10_000, 20_000)
    print(f"10,000-row CSV ({len(data)} bytes) acknowledged in {elapsed:.2f} s")
    code, status = await served.status(body["request_id"])
    assert code == 200
    assert status["progress"] == {"images": 20_000, "done": 0, "failed": 0, "pending": 20_000}
    assert len(status["products"]) == 10_000
    assert helpers.query(served.settings, "SELECT count(*) FROM events") == [(20_001,)]


async def test_each_upload_logs_once(served: Any, helpers: Any) -> None:
    """Two good uploads and one bad one log two csv_accepted and one csv_rejected."""
    good = helpers.sample_csv.read_bytes()
    with capture_logs() as logs:
        ids = []
        for data in (good, b"not,a,csv\n", good):
            response = await served.client.post("/upload", data=multipart(data, "x.csv"))
            if response.status == 202:
                ids.append((await response.json())["request_id"])
    assert len(ids) == 2
    assert [e["request_id"] for e in accepted_logs(logs, "csv_accepted")] == ids
    assert len(accepted_logs(logs, "csv_rejected")) == 1


async def test_an_upload_waits_for_a_lagging_status_view_and_says_so(settings: Settings,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """While the status view lags, an upload's answer waits for it (logged as lag), and comes once it has caught up."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from daemon.app import build_app
    from daemon.eventlog import follower
    from daemon.http_api import STATUS_VIEW

    monkeypatch.setattr(follower, "LAG_WARNING", 0.05)
    app = build_app(settings, follow=False)  # nothing follows the log until the test starts the view
    async with TestClient(TestServer(app)) as client:
        with capture_logs() as logs:
            upload = asyncio.ensure_future(client.post("/upload", data=b"S. No.,Product Name,Input Image Urls\n"
                                                       b"1,Mug,http://example.com/a.jpg\n",
                                                       headers={"Content-Type": "text/csv"}))
            while not any(e["event"] == "consumer_lagging" for e in logs):
                assert not upload.done()
                await asyncio.sleep(0.01)
            view = asyncio.create_task(app[STATUS_VIEW].run())
            try:
                response = await upload
                request_id = (await response.json())["request_id"]
                status = await client.get(f"/status/{request_id}")
            finally:
                view.cancel()
                await asyncio.gather(view, return_exceptions=True)
    assert response.status == 202 and status.status == 200
    lag = next(e for e in logs if e["event"] == "consumer_lagging")
    assert (lag["consumer"], lag["log_level"]) == ("view.status", "warning")
