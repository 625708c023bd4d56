"""Writing files so that a reader, a retry or a crash never sees half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TEMP_RANDOM_BYTES = 8
# write_atomic's temp files, which only a crash leaves behind: each writer removes them from its folder at start.
TEMP_FILES = ".*." + "[0-9a-f]" * (2 * TEMP_RANDOM_BYTES) + ".tmp"


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` through a hidden temp file in the same folder, then rename it into place."""
    # Same folder so os.replace is atomic; hidden so listings and /images skip it; O_EXCL with 0o666 lets
    # the umask decide permissions like an ordinary file; a random part so concurrent writers never collide.
    directory, name = os.path.split(os.fspath(path))
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(TEMP_RANDOM_BYTES)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileNotFoundError:  # the folder was removed while the daemon ran (it made it at start): again
        os.makedirs(directory or ".", exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def remove_matching(folder: Path, pattern: str) -> None:
    for path in folder.glob(pattern):
        path.unlink(missing_ok=True)
