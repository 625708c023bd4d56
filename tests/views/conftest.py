"""The views on both backends: every test here runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest


@pytest.fixture
def database_url(either_database_url: str) -> str:
    """Every test here runs on both backends."""
    return either_database_url
