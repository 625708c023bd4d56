"""The classic flow through the real daemon process: upload, status, export CSV, output URLs; inbox to outbox."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import Any

import aiohttp
import pytest
from PIL import Image

from daemon.testing import Listener, Origin, jpeg_bytes, photo

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


async def wait_finished(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    for _ in range(1200):
        async with session.get(url) as response:
            body: dict[str, Any] = await response.json()
        if body["status"] not in ("queued", "processing"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"not finished: {body}")


async def test_upload_to_export_to_output_url(daemon: Any) -> None:
    """Upload, poll to completion, download the export CSV and fetch every output URL it lists."""
    files = {"a.jpg": jpeg_bytes(photo(800, 600, seed=11)), "b.jpg": jpeg_bytes(photo(640, 640, seed=12))}
    async with Origin(files) as origin, aiohttp.ClientSession() as session:
        csv_text = ("S. No.,Product Name,Input Image Urls\n"
                    f'1,Shoe,"{origin.url}/img/a.jpg, {origin.url}/code/404"\n'
                    f"2,=HYPERLINK(\"x\"),{origin.url}/img/b.jpg\n")
        form = aiohttp.FormData()
        form.add_field("file", csv_text.encode(), filename="batch.csv", content_type="text/csv")
        async with session.post(f"{daemon.base_url}/upload", data=form) as response:
            assert response.status == 202
            accepted = await response.json()
        async with session.get(f"{daemon.base_url}/export/{accepted['request_id']}") as early:
            assert early.status in (409, 200)
        status = await wait_finished(session, accepted["status_url"])
        assert status["status"] == "completed_with_errors"
        assert status["progress"] == {"images": 3, "done": 2, "failed": 1, "pending": 0}
        images = [image for product in status["products"] for image in product["images"]]
        done = [image for image in images if image["status"] == "compressed"]
        assert [image["quality"] for image in images] == [50, None, 50]
        assert all(0.5 < image["ssim"] < 1 for image in done) and images[1]["ssim"] is None
        summary = status["compression"]
        assert abs(summary.pop("ssim_mean") - (done[0]["ssim"] + done[1]["ssim"]) / 2) <= 0.0000051  # rounded to 5
        assert summary == {
            "bytes_in": sum(i["bytes_in"] for i in done), "bytes_out": sum(i["bytes_out"] for i in done),
            "bytes_saved": sum(i["bytes_in"] - i["bytes_out"] for i in done), "scored": 2,
            "ssim_lowest": min(i["ssim"] for i in done)}

        async with session.get(f"{daemon.base_url}/export/{accepted['request_id']}") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/csv")
            assert "attachment" in response.headers["Content-Disposition"]
            text = await response.text()
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
        assert rows[1][0] == "1" and rows[1][1] == "Shoe"
        first, missing = rows[1][3].split(",")
        assert missing == ""
        assert rows[2][1] == "'=HYPERLINK(\"x\")"  # neutralised against formula injection
        for url, source in ((first, files["a.jpg"]), (rows[2][3], files["b.jpg"])):
            assert url.startswith(f"{daemon.base_url}/images/")
            async with session.get(url) as response:
                assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
                assert response.headers.get("ETag")
                data = await response.read()
            with Image.open(io.BytesIO(data)) as out, Image.open(io.BytesIO(source)) as original:
                assert out.size == original.size
            assert len(data) < len(source)

        async with session.get(f"{daemon.base_url}/export") as response:
            assert response.status == 200
            assert accepted["request_id"] in await response.text()
        async with session.get(f"{daemon.base_url}/export/{accepted['request_id']}?columns=ssim,quality") as response:
            assert response.status == 200
            scored = list(csv.reader(io.StringIO(await response.text())))
        assert scored[0] == rows[0] + ["SSIM", "Quality"]
        assert [row[:4] for row in scored] == rows
        assert scored[1][4:] == [f"{images[0]['ssim']},", "50,"] and scored[2][4:] == [str(images[2]["ssim"]), "50"]
        for bad, reason in (("psnr", "'psnr' is not a column"), ("ssim,ssim", "'ssim' is named twice")):
            async with session.get(f"{daemon.base_url}/export?columns={bad}") as response:
                assert response.status == 400
                error = await response.json()
            assert (error["error"], error["field"]) == ("invalid_parameter", "columns") and reason in error["message"]
        for bad in ("..%2Fimgpipe.db", ".incoming", "nope.jpg"):
            async with session.get(f"{daemon.base_url}/images/{bad}") as response:
                assert response.status == 404
        assert (daemon.outbox / f"{accepted['request_id']}.csv").read_bytes() == text.encode()


async def test_inbox_batch_ends_in_the_outbox(daemon: Any) -> None:
    """A CSV dropped into inbox/ is processed and its result CSV appears in outbox/ named after it."""
    async with Origin({"a.jpg": jpeg_bytes(photo(500, 400, seed=13))}) as origin:
        (daemon.inbox / "spring.csv").write_text(
            f"S. No.,Product Name,Input Image Urls\n7,Hat,{origin.url}/img/a.jpg\n", encoding="utf-8")
        for _ in range(1200):
            written = list(daemon.outbox.glob("*--spring.csv"))
            if written:
                break
            await asyncio.sleep(0.05)
        (result,) = written
        request_id = result.name.split("--")[0]
        assert (daemon.archive / f"{request_id}--spring.csv").exists()
        rows = list(csv.reader(io.StringIO(result.read_text(encoding="utf-8"))))
        assert rows[1][:3] == ["7", "Hat", f"{origin.url}/img/a.jpg"]
        assert rows[1][3] == f"{daemon.base_url}/images/{request_id}_7_0.jpg"


async def test_cli_redeliver_sends_the_same_webhook_id_again(daemon: Any) -> None:
    """`imgpipe redeliver ID` makes the per-request listener receive the completion message again, same id."""
    async with Origin({"a.jpg": jpeg_bytes(photo(300, 200, seed=14))}) as origin, Listener([200]) as listener, \
            aiohttp.ClientSession() as session:
        body = f"S. No.,Product Name,Input Image Urls\n1,Cap,{origin.url}/img/a.jpg\n".encode()
        async with session.post(f"{daemon.base_url}/upload", params={"webhook_url": listener.url}, data=body,
                                headers={"Content-Type": "text/csv"}) as response:
            accepted = await response.json()
        await wait_finished(session, accepted["status_url"])
        await listener.wait_for(1, timeout=20)
        done = await asyncio.to_thread(daemon.cli, "redeliver", accepted["request_id"], "--config",
                                       str(daemon.client_config))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "queued"
        await listener.wait_for(2, timeout=20)
    first, second = listener.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == json.loads(done.stdout)["message_id"]
    assert json.loads(second.body)["data"]["request_id"] == accepted["request_id"]
