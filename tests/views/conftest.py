"""The views on both backends: every test here runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path,
                 both_backends: Callable[[str, Path], AbstractContextManager[str]]) -> Iterator[str]:
    """Every test here runs on both backends."""
    with both_backends(request.param, tmp_path) as url:
        yield url
