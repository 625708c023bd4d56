"""The page in a real browser: Debian's chromium driven by Playwright against the daemon as a real process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.testing import Listener, Origin, eventually, jpeg_bytes, photo

pytestmark = pytest.mark.browser

TOKEN = "page-test-token-7f3a"
PHOTOS = {f"shoe{n}.jpg": jpeg_bytes(photo(640, 480, seed=20 + n)) for n in range(3)}
HOSTILE_NAME = "<img src=x onerror=window.__pwned=1>"
WAIT_MS = 30_000


def csv_text(rows: list[tuple[str, list[str]]]) -> str:
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f'{n},{name},"{",".join(urls)}"' for n, (name, urls) in enumerate(rows, start=1)]
    return "\n".join(lines) + "\n"


async def open_page(browser: Any, daemon: Any, requested: list[Any] | None = None, token: bool = True) -> Any:
    """A new tab on the daemon's page, live, with the token entered (for a daemon with tokens); every request the tab
    makes from then on goes into `requested`."""
    page = await browser.new_page()
    seen = requested if requested is not None else []
    page.on("request", lambda request: seen.append(request))
    page.set_default_timeout(WAIT_MS)
    await page.goto(f"{daemon.base_url}/")
    if token:
        seen.clear()  # the first load went without a token: the daemon answered it 401
        await page.fill("#token", TOKEN)
        await page.click("#token-form button")
    await page.locator("#live").filter(has_text="live").wait_for()
    return page


def assert_token_only_in_headers(requested: list[Any]) -> None:
    """The token never appears in a URL the page asked for; the API calls carried it in their header."""
    assert requested
    assert not [r.url for r in requested if TOKEN in r.url]
    api = [r for r in requested if "/ui/" not in r.url and not r.url.endswith("/") and not r.url.startswith("blob:")]
    assert api and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api)


async def test_upload_progress_and_before_after(browser: Any, launch_daemon: Callable[..., Any], tmp_path: Path,
                                                database_url: str) -> None:
    """A CSV chosen on the page is uploaded with a webhook URL, its progress pushed to completed, its delivery shown,
    and one image compared before/after."""
    from playwright.async_api import expect

    async with Origin(PHOTOS) as origin, Listener() as listener:
        with launch_daemon(tmp_path, database_url, IMGPIPE_SERVER_TOKENS=TOKEN) as daemon:
            requested: list[Any] = []
            page = await open_page(browser, daemon, requested)
            catalog = tmp_path / "catalog.csv"
            catalog.write_text(csv_text([("Trail shoe", [f"{origin.url}/img/shoe0.jpg", f"{origin.url}/img/shoe1.jpg"]),
                                         ("Road shoe", [f"{origin.url}/img/shoe2.jpg"])]), encoding="utf-8")
            await page.set_input_files("#file", str(catalog))
            await expect(page.locator("#chosen")).to_contain_text("catalog.csv")
            await page.fill("#webhook", listener.url)
            await page.click("#upload-button")
            await expect(page.locator("#upload-result")).to_contain_text("Accepted: 2 products, 3 images")
            row = page.locator("#request-table tbody tr").first
            await expect(row.locator(".badge")).to_have_text("completed", timeout=WAIT_MS)
            await expect(row).to_contain_text("3/3")
            # Pushed over the event stream: the list was read once (and once when the token was set), never polled.
            listings = [r.url for r in requested if "/requests?" in r.url]
            assert len(listings) <= 3, listings
            assert [r for r in requested if r.url.endswith("/events")]

            await expect(page.locator("#r-status")).to_have_text("completed")
            delivery = page.locator("#deliveries tbody tr")
            await expect(delivery).to_have_count(1)
            await expect(delivery.locator("td").first).to_have_text(listener.url)
            await expect(delivery.locator(".badge")).to_have_text("delivered", timeout=WAIT_MS)
            await expect(delivery).to_contain_text("HTTP 200")
            assert len(listener.received) == 1
            images = page.locator("#images tbody tr")
            await expect(images).to_have_count(3)
            await expect(images.first).to_contain_text("Trail shoe")
            await expect(images.first.locator(".badge")).to_have_text("compressed")
            # Properties, not wait_for_function: its string predicate needs eval, which the page's CSP refuses.
            for thumb in await page.locator("#images img.thumb").all():
                await expect(thumb).to_have_js_property("naturalWidth", 640)
            await images.first.get_by_role("button", name="Before / after").click()
            await expect(page.locator("#compare")).to_have_attribute("data-ready", "true")
            assert await page.eval_on_selector("#c-before", "i => [i.naturalWidth, i.naturalHeight]") == [640, 480]
            assert await page.eval_on_selector("#c-after", "i => [i.naturalWidth, i.naturalHeight]") == [640, 480]
            await expect(page.locator("#c-sizes")).to_contain_text(f"before {len(PHOTOS['shoe0.jpg']) / 1024:.1f} KB")
            await page.fill("#c-slider", "30")
            assert await page.eval_on_selector("#c-after", "i => i.style.clipPath") == "inset(0px 0px 0px 30%)"
            await page.set_viewport_size({"width": 1280, "height": 900})
            await page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 10_000
            assert_token_only_in_headers(requested)


async def test_untrusted_names_show_as_text_and_problems_inline(browser: Any, launch_daemon: Callable[..., Any],
                                                                tmp_path: Path, database_url: str) -> None:
    """A bad CSV's problems show with line, column and reason; a product named like markup shows as that text and
    runs nothing."""
    from playwright.async_api import expect

    async with Origin(PHOTOS) as origin:
        with launch_daemon(tmp_path, database_url, IMGPIPE_SERVER_TOKENS=TOKEN) as daemon:
            page = await open_page(browser, daemon)
            bad = csv_text([("Fine", [f"{origin.url}/img/shoe0.jpg"]), (HOSTILE_NAME, ["ftp://nowhere/x.jpg"])])
            await drop_file(page, "bad.csv", bad)
            await page.click("#upload-button")
            problems = page.locator("#problems tbody tr")
            await expect(problems).to_have_count(1)
            assert await problems.first.locator("td").all_inner_texts() == [
                "3", "Input Image Urls", await problems.first.locator("td").nth(2).inner_text()]
            await expect(problems.first.locator("td").nth(2)).to_contain_text("ftp://nowhere/x.jpg")

            hostile = csv_text([(HOSTILE_NAME, [f"{origin.url}/img/shoe0.jpg", f"{origin.url}/code/404"])])
            await drop_file(page, "hostile.csv", hostile)
            await page.click("#upload-button")
            images = page.locator("#images tbody tr")
            await expect(images.nth(1).locator(".badge")).to_have_text("failed", timeout=WAIT_MS)
            await expect(images.first.locator("td").nth(1).locator("div")).to_have_text(HOSTILE_NAME)
            await expect(images.nth(1)).to_contain_text("HTTP 404 Not Found")
            assert await page.evaluate("window.__pwned") is None
            assert await page.locator("img[src='x']").count() == 0


async def drop_file(page: Any, name: str, text: str) -> None:
    """Drop a file holding `text` on the page's drop zone, as a drag from the desktop would."""
    transfer = await page.evaluate_handle(
        "([name, text]) => { const d = new DataTransfer(); d.items.add(new File([text], name, {type: 'text/csv'}));"
        " return d; }", [name, text])
    await page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    await page.locator("#chosen").filter(has_text=name).wait_for()


async def test_csp_blocks_inline_script_and_the_token_stays_out_of_urls(
        browser: Any, launch_daemon: Callable[..., Any], tmp_path: Path, database_url: str) -> None:
    """The page arrives with a CSP allowing no inline script (an injected one does not run), and across loading,
    the list, a request's view and its images, no URL the page requests holds the token."""
    from playwright.async_api import expect

    async with Origin(PHOTOS) as origin:
        with launch_daemon(tmp_path, database_url, IMGPIPE_SERVER_TOKENS=TOKEN) as daemon:
            page = await browser.new_page()
            response = await page.goto(f"{daemon.base_url}/")
            csp = response.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
            await page.evaluate("() => { const s = document.createElement('script');"
                                " s.textContent = 'window.__inline = 1'; document.body.append(s); }")
            assert await page.evaluate("window.__inline") is None
            await page.close()

            requested: list[Any] = []
            page = await open_page(browser, daemon, requested)
            await drop_file(page, "one.csv", csv_text([("Boot", [f"{origin.url}/img/shoe1.jpg"])]))
            await page.click("#upload-button")
            await expect(page.locator("#r-status")).to_have_text("completed", timeout=WAIT_MS)
            await expect(page.locator("#images img.thumb").first).to_have_js_property("naturalWidth", 640)
            await page.reload()  # the token is kept for the tab, not put anywhere else
            await page.locator("#live").filter(has_text="live").wait_for()
            await expect(page.locator("#request-table tbody tr")).to_have_count(1)
            assert_token_only_in_headers(requested)


async def test_a_10000_image_request_is_shown_a_page_at_a_time(browser: Any, launch_daemon: Callable[..., Any],
                                                                tmp_path: Path, database_url: str) -> None:
    """A request of 10,000 images shows 20 products at a time (never a row per image) and pages on."""
    from playwright.async_api import expect

    async with Origin(PHOTOS) as origin:
        with launch_daemon(tmp_path, database_url) as daemon:
            page = await open_page(browser, daemon, token=False)
            big = tmp_path / "big.csv"
            urls = [f"{origin.url}/code/404?n={n}" for n in range(2)]
            big.write_text(csv_text([(f"Product {n}", urls) for n in range(5000)]), encoding="utf-8")
            await page.set_input_files("#file", str(big))
            await page.click("#upload-button")
            await expect(page.locator("#upload-result")).to_contain_text("5000 products, 10000 images")
            await expect(page.locator("#r-page")).to_have_text("products 1–20 of 5000")
            await expect(page.locator("#images tbody tr")).to_have_count(40)
            await page.click("#r-next")
            await expect(page.locator("#r-page")).to_have_text("products 21–40 of 5000")
            await expect(page.locator("#images tbody tr").first).to_contain_text("Product 20")
            assert await page.evaluate("document.querySelectorAll('tr').length") < 100


async def test_cancel_retry_and_export_from_the_request_view(browser: Any, launch_daemon: Callable[..., Any],
                                                             tmp_path: Path, database_url: str) -> None:
    """A request stuck on a stalling origin is cancelled with its button; a finished one with a failed image is
    retried with its button; the export link downloads the request's CSV."""
    from playwright.async_api import expect

    async with Origin(PHOTOS) as origin:
        with launch_daemon(tmp_path, database_url) as daemon:
            page = await open_page(browser, daemon, token=False)
            await drop_file(page, "stuck.csv", csv_text([("Stuck", [f"{origin.url}/stall"])]))
            await page.click("#upload-button")
            await expect(page.locator("#r-status")).to_have_text("queued")  # no image event while it downloads

            async def stalled() -> bool:
                return origin.hits["/stall"] == 1

            await eventually(stalled, "the download to reach the stalling origin")
            await page.click("#r-cancel")
            await expect(page.locator("#r-status")).to_have_text("cancelled", timeout=WAIT_MS)
            await expect(page.locator("#r-message")).to_have_text("Cancelled (0 images done).")

            await drop_file(page, "mixed.csv", csv_text([("Mixed", [f"{origin.url}/img/shoe0.jpg",
                                                                    f"{origin.url}/code/404"])]))
            await page.click("#upload-button")
            await expect(page.locator("#r-status")).to_have_text("completed_with_errors", timeout=WAIT_MS)
            await page.click("#r-retry")
            await expect(page.locator("#r-message")).to_have_text("Retrying 1 failed images (round 1).")
            await expect(page.locator("#r-status")).to_have_text("completed_with_errors", timeout=WAIT_MS)
            async with page.expect_download() as download_info:
                await page.click("#r-export")
            download = await download_info.value
            exported = (await download.path()).read_text(encoding="utf-8")
            assert exported.splitlines()[0] == "S. No.,Product Name,Input Image Urls,Output Image Urls"
            assert f"{daemon.base_url}/images/" in exported
