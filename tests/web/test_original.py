"""GET /requests/<id>/images/<product>/<index>/original: the "before" image, fetched on demand like a download."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from daemon.testing import Origin


def original(rid: str, product: int = 0, index: int = 0) -> str:
    return f"/requests/{rid}/images/{product}/{index}/original"


async def test_the_original_is_the_origins_bytes(serve: Callable[..., Any], origin: Origin,
                                                 photos: dict[str, bytes]) -> None:
    """The before image of each image is what its origin serves, as image/jpeg whatever type the origin claims."""
    async with serve() as served:
        rid = await served.upload(("Shoe", [f"{origin.url}/img/p0.jpg", f"{origin.url}/redirect/p1.jpg"]))
        await served.finished(rid)
        for index, name in enumerate(("p0.jpg", "p1.jpg")):
            response = await served.client.get(original(rid, 0, index))
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/jpeg"
            assert await response.read() == photos[name]


async def test_an_unknown_image_answers_404(serve: Callable[..., Any], origin: Origin) -> None:
    """A request, product or index that does not exist answers 404 JSON."""
    async with serve() as served:
        rid = await served.upload(("Shoe", [f"{origin.url}/img/p0.jpg"]))
        await served.finished(rid)
        for path in (original("nope"), original(rid, 1, 0), original(rid, 0, 1), f"/requests/{rid}/images/x/0/original"):
            response = await served.client.get(path)
            assert response.status == 404, path
            assert (await response.json())["error"] == "unknown_image"


async def test_the_original_is_refused_where_downloads_are(serve: Callable[..., Any], origin: Origin) -> None:
    """With the default network rules, an image on a loopback name is not fetched: 403 naming why, and no request
    reaches the origin."""
    async with serve(network={"allow_private": False}) as served:
        local = origin.url.replace("127.0.0.1", "localhost")
        rid = await served.upload(("Shoe", [f"{local}/img/p0.jpg"]))
        await served.finished(rid)
        response = await served.client.get(original(rid))
        body = await response.json()
        assert response.status == 403
        assert body["error"] == "original_refused"
        assert body["message"].startswith("the original image is not fetched: refused to connect: localhost resolves "
                                          "to 127.0.0.1, a loopback address")
    assert origin.hits == {}


async def test_an_original_over_the_byte_cap_is_not_relayed(serve: Callable[..., Any], origin: Origin,
                                                            photos: dict[str, bytes]) -> None:
    """An origin answering 404, declaring a size over download.max_bytes, or streaming past it, gets the client a
    clear 502 or a body cut short at the cap, never the whole body."""
    cap = 5_000
    assert len(photos["p0.jpg"]) > cap
    async with serve(download={"max_bytes": cap, "attempts": 1}) as served:
        rid = await served.upload(("Shoe", [f"{origin.url}/code/404", f"{origin.url}/img/p0.jpg",
                                            f"{origin.url}/huge?mb=3"]))
        await served.finished(rid)
        reasons = []
        for index in (0, 1):
            answer = await served.client.get(original(rid, 0, index))
            assert answer.status == 502
            reasons.append((await answer.json())["message"])
        assert reasons == ["the original image cannot be fetched: the origin answered HTTP 404",
                           f"the original image cannot be fetched: it is {len(photos['p0.jpg'])} bytes, over the "
                           f"limit of {cap} bytes"]
        response = await served.client.get(original(rid, 0, 2))
        assert response.status == 200  # the first bytes went out before the body passed the cap
        received = 0
        try:
            async for chunk in response.content.iter_any():
                received += len(chunk)
        except aiohttp.ClientPayloadError:
            pass
        assert received <= cap
