"""The stages end to end in burst mode: real origin, real pool, real SQLite, assertions on pixels and bytes."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import ssl
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image
from structlog.testing import capture_logs

from daemon.app import BODIES, EVENTLOG, FOLLOWERS, POOL
from daemon.config import Settings
from daemon.eventlog.store import EventLog
from daemon.events import ImageRequested
from daemon.http_api import SETTINGS
from daemon.ingest.accept import Accepted, accept
from daemon.ingest.csvfile import Batch, parse_csv
from daemon.stages.codec import compress_file
from daemon.stages.compress import encode_settings
from daemon.testing import Origin, daemon_app, drain, eventually
from daemon.views.export import export_rows, to_csv
from daemon.views.status import request_status


def csv_bytes(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for serial, product in enumerate(rows, start=1):
        writer.writerow([str(serial), f"Product {serial}", ",".join(product)])
    return out.getvalue().encode()


async def submit(app: web.Application, rows: list[list[str]]) -> Accepted:
    batch = parse_csv(csv_bytes(rows), app[SETTINGS].limits)
    assert isinstance(batch, Batch), batch
    return await accept(app[EVENTLOG], batch, "upload", "test.csv")


async def status_of(app: web.Application, request_id: str) -> dict[str, Any]:
    body = await app[EVENTLOG].query(request_status, request_id, app[SETTINGS].public_url)
    assert body is not None
    return body


def images_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [image for product in body["products"] for image in product["images"]]


def output_file(settings: Settings, image: dict[str, Any]) -> Path:
    return settings.path("images") / image["output_url"].rsplit("/", 1)[1]


def event_types(eventlog: EventLog, stream: str) -> Counter[str]:
    return Counter(r.type for r in eventlog.read_stream_sync(stream))


async def test_every_kind_of_image_gets_the_right_outcome(app: web.Application, origin: Origin,
                                                          settings: Settings, image_files: dict[str, bytes]) -> None:
    """Each image kind ends as compressed, kept or failed with a clear error, judged from pixels and bytes."""
    u = origin.url
    accepted = await submit(app, [
        [f"{u}/img/photo.jpg", f"{u}/img/rotated.jpg", f"{u}/img/alpha.png"],
        [f"{u}/img/low.jpg", f"{u}/code/404", f"{u}/flaky/photo2.jpg"],
        [f"{u}/redirect/photo.jpg", f"{u}/img/truncated.jpg", f"{u}/html", f"{u}/empty"],
    ])
    await drain(app)
    body = await status_of(app, accepted.request_id)
    assert body["status"] == "completed_with_errors"
    assert body["progress"] == {"images": 10, "done": 6, "failed": 4, "pending": 0}
    photo, rotated, alpha, low, missing, flaky, redirected, truncated, html, empty = images_of(body)

    assert photo["status"] == "compressed" and photo["format"] == "JPEG"
    assert photo["bytes_in"] == len(image_files["photo.jpg"])
    assert photo["bytes_out"] < photo["bytes_in"]
    with Image.open(output_file(settings, photo)) as out:
        assert out.size == (640, 480) and out.format == "JPEG"
    assert output_file(settings, photo).stat().st_size == photo["bytes_out"]

    with Image.open(output_file(settings, rotated)) as out:
        assert out.size == (300, 200)
        assert out.convert("RGB").getpixel((150, 40))[0] > 200  # red on top
        assert out.convert("RGB").getpixel((150, 160))[2] > 200  # blue below

    assert alpha["format"] == "WEBP"
    with Image.open(output_file(settings, alpha)) as out:
        assert out.mode == "RGBA" and out.getpixel((10, 10))[3] == 0 and out.getpixel((300, 200))[3] == 255

    assert low["status"] == "kept_original" and low["bytes_out"] == low["bytes_in"]
    assert (low["ssim"], low["quality"]) == (1.0, None)
    assert all(0.5 < image["ssim"] < 1 and image["quality"] == 50 for image in (photo, rotated, alpha, flaky))
    assert [image["ssim"] for image in (missing, truncated, html, empty)] == [None] * 4
    assert output_file(settings, low).read_bytes() == image_files["low.jpg"]

    assert missing["status"] == "failed" and "HTTP 404" in missing["error"] and missing["output_url"] is None
    assert flaky["status"] == "compressed" and flaky["attempts"] == 3
    assert origin.hits["/flaky/photo2.jpg"] == 3
    assert redirected["status"] == "compressed"
    assert truncated["status"] == "failed" and "truncated" in truncated["error"]
    assert html["status"] == "failed" and "HTML" in html["error"]
    assert empty["status"] == "failed" and "empty" in empty["error"]

    types = event_types(app[EVENTLOG], accepted.request_id)
    assert types["ImageDownloadRetried"] == 2 and types["RequestCompleted"] == 1
    assert app[BODIES].request_folders() == []  # no body left: each became a recycled file or was removed
    assert len(list(app[BODIES].recycled_folder.iterdir())) <= settings.download.backlog
    assert not [p for p in settings.path("images").iterdir() if p.name.endswith(".tmp")]


async def test_export_keeps_input_order_and_blank_for_failures(app: web.Application, origin: Origin,
                                                               settings: Settings) -> None:
    """The export CSV lists outputs in input order, absolute, with an empty entry where an image failed."""
    u = origin.url
    accepted = await submit(app, [[f"{u}/img/photo.jpg", f"{u}/code/404", f"{u}/img/photo2.jpg"]])
    await drain(app)
    rows = await app[EVENTLOG].query(export_rows, [accepted.request_id], settings.images_url)
    text = to_csv(rows)
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    outputs = parsed[1][3].split(",")
    assert len(outputs) == 3 and outputs[1] == ""
    assert outputs[0] == f"http://images.example/images/{accepted.request_id}_1_0.jpg"
    assert outputs[2] == f"http://images.example/images/{accepted.request_id}_1_2.jpg"
    outbox = settings.path("outbox") / f"{accepted.request_id}.csv"
    assert outbox.read_bytes() == text.encode("utf-8")


async def test_transient_failures_give_up_after_the_configured_attempts(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """A 503 (or a CDN's 520) forever is retried `attempts` times, each attempt an event, then fails with a clear
    error."""
    settings = make_settings(download={"attempts": 3})
    async with daemon_app(settings) as app:
        accepted = await submit(app, [[f"{origin.url}/code/503", f"{origin.url}/img/photo.jpg",
                                       f"{origin.url}/code/520"]])
        await drain(app)
        body = await status_of(app, accepted.request_id)
        failing, good, cdn = images_of(body)
        assert failing["status"] == "failed" and failing["attempts"] == 3
        assert failing["error"] == "download failed: HTTP 503 Service Unavailable (after 3 attempts)"
        assert good["status"] == "compressed"
        assert (cdn["status"], cdn["attempts"]) == ("failed", 3)
        assert origin.hits["/code/503"] == 3 and origin.hits["/code/520"] == 3
        assert event_types(app[EVENTLOG], accepted.request_id)["ImageDownloadRetried"] == 4
        assert body["status"] == "completed_with_errors"


async def test_all_failed_request_is_failed(app: web.Application, origin: Origin) -> None:
    """A request whose every image failed completes with status failed."""
    accepted = await submit(app, [[f"{origin.url}/code/404"], [f"{origin.url}/html"]])
    await drain(app)
    assert (await status_of(app, accepted.request_id))["status"] == "failed"


async def test_byte_cap_and_redirect_limit(make_settings: Callable[..., Settings], origin: Origin) -> None:
    """A body over the byte cap and a redirect loop fail at once with errors that say so."""
    settings = make_settings(download={"max_bytes": 2 * 1024 * 1024})
    async with daemon_app(settings) as app:
        accepted = await submit(app, [[f"{origin.url}/huge?mb=50", f"{origin.url}/loop"]])
        await drain(app)
        huge, loop = images_of(await status_of(app, accepted.request_id))
        assert huge["error"] == f"download failed: image is over the limit of {2 * 1024 * 1024} bytes"
        assert loop["error"] == "download failed: too many redirects (more than 5)"
        assert origin.hits["/loop"] == 6


async def test_a_redirect_to_an_unresolvable_host_name_fails_the_image_at_once(app: web.Application,
                                                                              origin: Origin) -> None:
    """A redirect to a host with an empty label fails that image with a clear error on the first attempt, and the
    rest of the request completes (the resolver's encoding error once hung the image and held a download slot)."""
    bad = f"{origin.url}/to?url=http://cdn..shop.example/a.jpg"
    accepted = await submit(app, [[bad], [f"{origin.url}/img/photo.jpg"]])
    async with asyncio.timeout(30):  # before the fix, the image was retried for ever
        await drain(app)
    body = await status_of(app, accepted.request_id)
    failed, fine = images_of(body)
    assert failed["error"] == "download failed: invalid host name (a label is empty or longer than 63 characters)"
    assert failed["attempts"] == 1 and fine["status"] == "compressed"
    assert body["status"] == "completed_with_errors"


async def test_a_redirect_to_a_url_that_is_not_http_fails_at_once(app: web.Application, origin: Origin) -> None:
    """A redirect to ftp:// or file:// fails its image on the first attempt (it used to be retried as transient)."""
    accepted = await submit(app, [[f"{origin.url}/to?url=ftp://files.example/a.jpg"],
                                  [f"{origin.url}/to?url=file:///etc/passwd"]])
    await drain(app)
    for image in images_of(await status_of(app, accepted.request_id)):
        assert image["status"] == "failed" and image["attempts"] == 1
        assert image["error"].startswith("download failed: redirected to a URL that is not http(s): ")


@pytest.fixture
async def tls_origin(tmp_path: Path, image_files: dict[str, bytes]) -> AsyncIterator[str]:
    """The photo served over HTTPS with a self-signed certificate (made by the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async def photo(_: web.Request) -> web.Response:
        return web.Response(body=image_files["photo.jpg"])

    app = web.Application()
    app.router.add_get("/photo.jpg", photo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_certificate_the_client_cannot_trust_fails_the_image_at_once(app: web.Application,
                                                                             tls_origin: str) -> None:
    """An HTTPS origin whose certificate is self-signed fails its image on the first attempt, saying why (it used to
    be retried as a connection failure)."""
    accepted = await submit(app, [[f"{tls_origin}/photo.jpg"]])
    await drain(app)
    (image,) = images_of(await status_of(app, accepted.request_id))
    assert image["status"] == "failed" and image["attempts"] == 1
    assert image["error"] == ("download failed: the server's TLS certificate is not valid for 127.0.0.1: "
                              "self-signed certificate")


async def test_restart_mid_batch_resumes_without_redoing_work(make_settings: Callable[..., Settings],
                                                             origin: Origin, tmp_path: Path) -> None:
    """After a crash between stages, finished images are not redone, the rest are, and completion happens once."""
    settings = make_settings()
    # In tmp_path: beside the working folder is ~/.cache/imgpipe on PostgreSQL, where an earlier run left it.
    work, kept = settings.path("work"), tmp_path / "kept-by-the-crash"
    urls = [f"{origin.url}/img/photo.jpg", f"{origin.url}/img/photo2.jpg", f"{origin.url}/img/rotated.jpg"]
    async with daemon_app(settings) as app:
        accepted = await submit(app, [urls[:2], urls[2:]])
        followers = {f.name.partition("@")[0]: f for f in app[FOLLOWERS]}
        await followers["view.status"].run_until_idle()
        await followers["stage.download"].run_until_idle()
        # Work done but never committed, as if killed between writing the output and recording it.
        requested = [r.event for r in app[EVENTLOG].read_stream_sync(accepted.request_id)
                     if isinstance(r.event, ImageRequested)]
        first = requested[0]
        compress_file(str(app[BODIES].path(accepted.request_id, 0, 0)), str(settings.path("images")),
                      first.stem, encode_settings(settings.compress))
        shutil.copytree(work, kept)  # a crash leaves the working files that a clean stop removes
    shutil.copytree(kept, work, dirs_exist_ok=True)
    downloads_before = sum(origin.hits.values())
    async with daemon_app(settings) as app:
        await drain(app)
        types = event_types(app[EVENTLOG], accepted.request_id)
        body = await status_of(app, accepted.request_id)
    assert sum(origin.hits.values()) == downloads_before  # nothing downloaded twice
    assert types["ImageDownloaded"] == 3 and types["ImageCompressed"] == 3 and types["RequestCompleted"] == 1
    assert body["status"] == "completed"
    outputs = sorted(p.name for p in settings.path("images").iterdir() if p.is_file())
    assert outputs == sorted(f"{r.stem}.jpg" for r in requested)
    assert not [p for p in settings.path("images").rglob("*")
                if p.is_file() and p.parent not in (settings.path("images"), app[BODIES].recycled_folder)]

    async with daemon_app(settings) as app:  # a third start has nothing left to do
        assert await drain(app) == 0


async def test_every_codec_worker_is_running_before_the_first_image(app: web.Application) -> None:
    """The daemon starts its whole pool at start-up, so the first batch does not wait for workers to spawn."""
    workers = app[POOL].pids
    assert len(workers) == app[SETTINGS].compress.workers == 2
    for pid in workers:
        os.kill(pid, 0)  # alive: raises ProcessLookupError otherwise
    assert await app[POOL].start() == workers  # warming up again runs in every one of them, spawning nothing
    assert app[POOL].pids == workers


async def test_a_dead_worker_is_replaced_and_the_batch_completes(app: web.Application, origin: Origin) -> None:
    """When a pool worker is killed (as the OOM killer would), another takes its place and every image completes."""
    first = await submit(app, [[f"{origin.url}/img/photo.jpg"]])
    await drain(app)
    victim = min(app[POOL].pids)
    with capture_logs() as logs:
        os.kill(victim, signal.SIGKILL)
        second = await submit(app, [[f"{origin.url}/img/photo2.jpg", f"{origin.url}/img/rotated.jpg"]])
        await drain(app)
    assert (await status_of(app, first.request_id))["status"] == "completed"
    body = await status_of(app, second.request_id)
    assert body["status"] == "completed" and [i["status"] for i in images_of(body)] == ["compressed", "compressed"]
    await eventually(lambda: asyncio.sleep(0, len(app[POOL].pids) == 2), "the replacement worker to start")
    assert victim not in app[POOL].pids
    assert [(e["event"], e["pid"]) for e in logs if e["event"] == "codec_worker_replaced"] == [
        ("codec_worker_replaced", victim)]


async def test_an_image_whose_compression_overruns_the_deadline_fails_once_with_a_readable_error(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """An image whose worker does not answer within compress.job_timeout (here: a stopped worker) fails at its first
    attempt with an error naming the limit; the image sent behind it to that worker is compressed by its
    replacement."""
    async with daemon_app(make_settings(compress={"workers": 1, "job_timeout": 0.5})) as app:
        (stopped,) = app[POOL].pids
        os.kill(stopped, signal.SIGSTOP)
        accepted = await submit(app, [[f"{origin.url}/img/photo.jpg", f"{origin.url}/img/photo2.jpg"]])
        with capture_logs() as logs:
            await asyncio.wait_for(drain(app), 20)
        body = await status_of(app, accepted.request_id)
        assert sorted((i["status"], i["error"]) for i in images_of(body)) == [
            ("compressed", None), ("failed", "compress failed: took longer than 0.5 s (compress.job_timeout)")]
        assert body["status"] == "completed_with_errors"
        # Attempted once: a second attempt would have gone to the replacement, which is not stopped, and succeeded.
        assert [e["pid"] for e in logs if e["event"] == "codec_job_timed_out"] == [stopped]
        assert len(app[POOL].pids) == 1 and stopped not in app[POOL].pids


async def test_attempts_made_before_a_restart_count(make_settings: Callable[..., Settings], origin: Origin) -> None:
    """A download retrying when the daemon stops gets only its remaining attempts after the restart."""
    waiting = make_settings(download={"attempts": 3, "backoff_base": 30.0, "backoff_max": 30.0})
    async with daemon_app(waiting, follow=True) as app:
        accepted = await submit(app, [[f"{origin.url}/code/503"]])

        async def retried() -> bool:
            return event_types(app[EVENTLOG], accepted.request_id)["ImageDownloadRetried"] == 1

        await eventually(retried, "the first attempt to fail and wait", 10, interval=0.02)
    assert origin.hits["/code/503"] == 1
    async with daemon_app(make_settings(download={"attempts": 3})) as app:
        await drain(app)
        (image,) = images_of(await status_of(app, accepted.request_id))
    assert origin.hits["/code/503"] == 3  # two more, not three
    assert image["attempts"] == 3
    assert image["error"] == "download failed: HTTP 503 Service Unavailable (after 3 attempts)"


def bodies_on_disk(app: web.Application) -> list[Path]:
    return [p for folder in app[BODIES].request_folders() for p in folder.iterdir()]


async def test_downloads_wait_while_the_backlog_is_full(make_settings: Callable[..., Settings], origin: Origin) -> None:
    """With backlog 2, the download stage stops at two bodies on disk and goes on as compression takes them."""
    async with daemon_app(make_settings(download={"backlog": 2})) as app:
        accepted = await submit(app, [[f"{origin.url}/img/photo.jpg"] * 5])
        followers = {f.name.partition("@")[0]: f for f in app[FOLLOWERS]}
        await followers["stage.download"].run_until_idle()
        assert len(bodies_on_disk(app)) == 2
        assert event_types(app[EVENTLOG], accepted.request_id)["ImageDownloaded"] == 2
        await followers["stage.compress"].run_until_idle()
        assert bodies_on_disk(app) == []
        await followers["stage.download"].run_until_idle()
        assert len(bodies_on_disk(app)) == 2
        await drain(app)
        body = await status_of(app, accepted.request_id)
    assert body["status"] == "completed" and body["progress"]["done"] == 5


async def test_a_commit_of_several_images_recycles_every_body_and_frees_its_place(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """The bodies of the images one compress commit settles become recycled files together, and each frees its place."""
    async with daemon_app(make_settings(download={"backlog": 4})) as app:
        await submit(app, [[f"{origin.url}/img/photo.jpg"] * 4])
        followers = {f.name.partition("@")[0]: f for f in app[FOLLOWERS]}
        await followers["stage.download"].run_until_idle()
        assert len(bodies_on_disk(app)) == 4 and app[BODIES].vacancies == 0
        await followers["stage.compress"].run_until_idle()
        assert bodies_on_disk(app) == [] and app[BODIES].vacancies == 4
        assert len(list(app[BODIES].recycled_folder.iterdir())) == 4


async def test_downloads_waiting_to_try_again_keep_their_place_in_the_backlog(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """With backlog 2 and an origin answering 503 to the first two requests for each name, the two downloads
    waiting to try again keep the others from starting: two bodies on disk at most, not ten."""
    async with daemon_app(make_settings(download={"backlog": 2})) as app:
        accepted = await submit(app, [[f"{origin.url}/flaky/{name}" for name in ("photo.jpg", "photo2.jpg") * 5]])
        followers = {f.name.partition("@")[0]: f for f in app[FOLLOWERS]}
        await followers["stage.download"].run_until_idle()
        assert len(bodies_on_disk(app)) == 2
        types = event_types(app[EVENTLOG], accepted.request_id)
        assert (types["ImageDownloaded"], types["ImageDownloadRetried"]) == (2, 4)  # the first two, twice each
        await drain(app)
        body = await status_of(app, accepted.request_id)
    assert body["status"] == "completed" and body["progress"]["done"] == 10


async def test_bodies_left_by_a_crash_after_their_compression_do_not_block_the_backlog(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """Bodies still on disk although their images were compressed (a crash right after the commit) are made recycled files
    at the next start, so with a full backlog of them the request still completes."""
    settings = make_settings(download={"backlog": 2})
    async with daemon_app(settings) as app:
        accepted = await submit(app, [[f"{origin.url}/img/photo.jpg"] * 3])
        followers = {f.name.partition("@")[0]: f for f in app[FOLLOWERS]}
        await followers["stage.download"].run_until_idle()
        await followers["stage.compress"].run_until_idle()
        spent = [app[BODIES].path(accepted.request_id, 0, index) for index in (0, 1)]
        assert bodies_on_disk(app) == [] and event_types(app[EVENTLOG], accepted.request_id)["ImageCompressed"] == 2
    for path in spent:  # as if the daemon died between the commit and making them recycled files
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"already compressed")
    async with daemon_app(settings) as app:
        await drain(app)
        body = await status_of(app, accepted.request_id)
        assert bodies_on_disk(app) == [] and app[BODIES].vacancies == 2
    assert body["status"] == "completed" and body["progress"]["done"] == 3


async def test_a_spare_body_is_overwritten_to_the_new_length(make_settings: Callable[..., Settings], origin: Origin,
                                                            image_files: dict[str, bytes]) -> None:
    """A compressed image's body is reused for the next download, cut to that download's own bytes."""
    settings = make_settings(download={"backlog": 1})
    async with daemon_app(settings) as app:
        big = await submit(app, [[f"{origin.url}/img/photo2.jpg"]])
        await drain(app)
        recycled = list(app[BODIES].recycled_folder.iterdir())
        assert len(recycled) == 1 and recycled[0].stat().st_size == len(image_files["photo2.jpg"])
        small = await submit(app, [[f"{origin.url}/img/low.jpg", f"{origin.url}/img/photo.jpg"]])
        await drain(app)
        kept, photo = images_of(await status_of(app, small.request_id))
        assert (await status_of(app, big.request_id))["status"] == "completed"
        assert len(list(app[BODIES].recycled_folder.iterdir())) == 1  # at most `backlog` recycled files are kept
    assert kept["status"] == "kept_original" and kept["bytes_in"] == len(image_files["low.jpg"])
    assert output_file(settings, kept).read_bytes() == image_files["low.jpg"]
    assert photo["status"] == "compressed" and photo["bytes_in"] == len(image_files["photo.jpg"])


async def test_a_clean_stop_empties_the_working_folder_and_a_restart_downloads_those_images_again(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """Downloaded bodies live in paths.work, never in the images folder; a clean stop removes them (and a start
    removes the folder older versions kept inside the images folder), and the next start completes the batch."""
    settings = make_settings()
    legacy = settings.path("images") / ".incoming" / "r1"
    legacy.mkdir(parents=True)
    (legacy / "0-0").write_bytes(b"a body an older version left")
    urls = [f"{origin.url}/img/photo.jpg", f"{origin.url}/img/photo2.jpg"]
    async with daemon_app(settings) as app:
        assert not (settings.path("images") / ".incoming").exists()
        accepted = await submit(app, [urls])
        followers = {f.name.partition("@")[0]: f for f in app[FOLLOWERS]}
        await followers["stage.download"].run_until_idle()
        assert len(bodies_on_disk(app)) == 2
        assert app[BODIES].incoming.is_relative_to(settings.path("work"))
    assert [p for p in settings.path("work").rglob("*") if p.is_file()] == []
    async with daemon_app(settings) as app:
        await drain(app)
        body = await status_of(app, accepted.request_id)
    assert body["status"] == "completed" and body["progress"]["done"] == 2
    assert origin.hits["/img/photo.jpg"] == origin.hits["/img/photo2.jpg"] == 2
