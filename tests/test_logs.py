"""The JSON log lines, and text that is not Unicode in them and in what the daemon stores."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from daemon import logs
from daemon.outside_text import storable


@pytest.fixture
def restored() -> Iterator[None]:
    handlers = logging.getLogger().handlers[:]
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = handlers


def test_a_surrogate_escaped_file_name_is_logged_escaped(restored: None) -> None:
    """A file name that is not UTF-8 still makes one JSON line, whose escape reads back as the same name."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    logs.configure(stream)
    structlog.get_logger("test").info("inbox_skipped", file="M\udce4rz.csv")
    (line,) = raw.getvalue().decode("utf-8").splitlines()
    assert line.startswith('{"event": "inbox_skipped"') and '"file": "M\\udce4rz.csv"' in line
    assert json.loads(line)["file"] == "M\udce4rz.csv"


@pytest.mark.parametrize(("text", "expected"), [
    ("März.csv", "März.csv"),
    ("M\udce4rz.csv", "M\ufffdrz.csv"),
    ("a\ud800b\udfffc", "a\ufffdb\ufffdc"),
    ("\U0001F600.csv", "\U0001F600.csv"),
])
def test_storable_replaces_only_lone_surrogates(text: str, expected: str) -> None:
    """Each lone surrogate becomes one U+FFFD; real characters, astral ones included, stay."""
    assert storable(text) == expected and storable(text).encode("utf-8")
