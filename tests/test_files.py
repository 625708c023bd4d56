"""Atomic writes: the temp files a crash leaves behind are removed when the daemon starts again."""

from __future__ import annotations

import secrets
from pathlib import Path

from daemon.ingest.inbox import REJECTED
from daemon.testing import daemon_app, drain, pipeline_settings


def crash_leftover(folder: Path, name: str) -> Path:
    """A temp file named as write_atomic names them, as a crash between writing and renaming leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.{secrets.token_hex(8)}.tmp"
    path.write_bytes(b"half of a file")
    return path


async def test_temp_files_left_by_a_crash_are_removed_at_start_up(tmp_path: Path) -> None:
    """At start-up the temp files a crash left in outbox/, inbox/rejected/ and images/ are removed; other files stay."""
    settings = pipeline_settings(tmp_path, inbox={"enabled": True})
    outbox, rejected, images = settings.path("outbox"), settings.path("inbox") / REJECTED, settings.path("images")
    leftovers = [crash_leftover(outbox, "0123--batch.csv"), crash_leftover(rejected, "0123--bad.csv.errors.txt"),
                 crash_leftover(images, "0123_1_0.jpg")]
    kept = [outbox / "0123--batch.csv", outbox / ".notes.tmp", rejected / "0123--bad.csv",
            rejected / "0123--bad.csv.errors.txt", images / "0123_1_0.jpg"]
    for path in kept:
        path.write_bytes(b"kept")
    async with daemon_app(settings) as app:
        await drain(app)
        assert [p for p in leftovers if p.exists()] == []
        assert [p for p in kept if not p.exists()] == []
