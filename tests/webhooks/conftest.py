"""Fixtures for webhooks: a daemon in tmp_path, an origin with one photo, helpers to run a batch."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.testing import Origin, jpeg_bytes, photo, pipeline_settings, with_database

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def database_url(either_database_url: str) -> str:
    """Every test here runs on both backends."""
    return either_database_url


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    return lambda **sections: pipeline_settings(tmp_path, **with_database(database_url, sections))


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin({"photo.jpg": jpeg_bytes(photo(320, 240, seed=5))}) as server:
        yield server
