"""Fixtures for the pipeline: a loopback image origin and the whole daemon driven in burst mode."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from daemon.config import Settings
from daemon.testing import Origin, daemon_app, jpeg_bytes, photo, pipeline_settings, with_database


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def rotated_jpeg() -> bytes:
    """Stored sideways with EXIF orientation 6: displayed upright, red is on top, blue below."""
    upright = Image.new("RGB", (300, 200), "blue")
    upright.paste((255, 0, 0), (0, 0, 300, 100))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 rotates it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(stored, quality=95, exif=exif.tobytes())


def alpha_png() -> bytes:
    image = photo(320, 240, seed=3).convert("RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 160, 120))
    return png_bytes(image)


@pytest.fixture
def image_files() -> dict[str, bytes]:
    good = jpeg_bytes(photo(640, 480, seed=1), quality=90)
    return {
        "photo.jpg": good,
        "photo2.jpg": jpeg_bytes(photo(800, 600, seed=2), quality=90),
        "rotated.jpg": rotated_jpeg(),
        "alpha.png": alpha_png(),
        "low.jpg": jpeg_bytes(photo(640, 480, seed=4), quality=30),
        "truncated.jpg": good[: len(good) // 2],
    }


@pytest.fixture
async def origin(image_files: dict[str, bytes]) -> AsyncIterator[Origin]:
    async with Origin(image_files) as server:
        yield server


@pytest.fixture
def database_url(either_database_url: str) -> str:
    """Every test here runs on both backends."""
    return either_database_url


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    """Settings for a daemon in tmp_path, with some sections changed."""
    return lambda **sections: pipeline_settings(tmp_path, **with_database(database_url, sections))


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[web.Application]:
    async with daemon_app(settings) as application:
        yield application
