"""Where compressed images are kept: the local images folder (paths.images), or an S3-compatible object store
([storage] url) through obstore.

An `ImageStore` is a small frozen value: it is pickled into each codec job, and the worker process writes the image
it has just encoded itself, so image bytes never cross the event loop. Keys are the output names (under the URL's
prefix), so writing one image again, after a crash or a retry, replaces it with the same bytes.

A store that is down or refuses a write raises StoreUnavailable, which daemon.diskspace treats like a full disk:
the image pauses, no attempt is spent, /healthz says "degraded" until a write succeeds again.
"""

from __future__ import annotations

import asyncio
import functools
import mimetypes
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.files import TEMP_FILES, remove_matching, write_atomic

if TYPE_CHECKING:
    from obstore.store import S3Store

    from daemon.config import Settings

# Names never change meaning (<request>_<product>_<index>, the same encode each time), so caches may keep them.
CACHE_CONTROL = "public, max-age=31536000, immutable"
# obstore retries 10 times over up to 3 minutes by default; the codec job has compress.job_timeout (120 s) in all.
# A short try here and the pause of daemon.diskspace (a new try every few seconds) cover a longer outage.
RETRIES = 2
RETRY_WINDOW = timedelta(seconds=10)
CONNECT_TIMEOUT = "5s"
REQUEST_TIMEOUT = "20s"
READ_CHUNK = 256 * 1024


class StoreUnavailable(Exception):
    """The object store did not do what was asked (down, unreachable, refusing): never the image's fault."""


def content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _reason(exc: BaseException) -> str:
    """obstore's first line (the rest is a multi-line debug dump)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


class ImageStore(ABC):
    """Where output images go. `write` runs in a codec worker; the rest on the event loop."""

    place: str  # what daemon.diskspace pauses when a write fails for want of room or of the store

    @abstractmethod
    def write(self, name: str, data: bytes) -> None:
        """(worker) Store `data` as `name`, all or nothing; the same name again replaces it."""

    @abstractmethod
    async def remove(self, names: list[str]) -> None:
        """Remove these images; those already gone are fine."""

    async def recover(self) -> None:
        """Clear what a crash left half done."""


@dataclass(frozen=True)
class FolderStore(ImageStore):
    """paths.images: files written through a temp file and a rename."""

    folder: str
    place = "images"

    def write(self, name: str, data: bytes) -> None:
        write_atomic(os.path.join(self.folder, name), data)

    async def remove(self, names: list[str]) -> None:
        await asyncio.to_thread(_unlink_all, [Path(self.folder) / name for name in names])

    async def recover(self) -> None:
        await asyncio.to_thread(remove_matching, Path(self.folder), TEMP_FILES)


def _unlink_all(paths: list[Path]) -> None:
    """(thread)"""
    for path in paths:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ObjectStore(ImageStore):
    """An S3-compatible bucket; each write is one PUT with the image's Content-Type and a long Cache-Control."""

    url: str  # s3://bucket[/prefix]
    endpoint: str = ""
    region: str = ""
    place = "store"

    def write(self, name: str, data: bytes) -> None:
        import obstore

        try:
            # One PUT: atomic, and no multipart parts left behind in the bucket by a failure.
            obstore.put(_client(self), name, data, use_multipart=False,
                        attributes={"Content-Type": content_type(name), "Cache-Control": CACHE_CONTROL})
        except Exception as exc:  # obstore's errors may not unpickle in the daemon: send a plain one back
            raise StoreUnavailable(f"writing {name}: {_reason(exc)}") from None

    async def remove(self, names: list[str]) -> None:
        import obstore

        if not names:
            return
        try:
            await obstore.delete_async(_client(self), names)
        except FileNotFoundError:  # gone already
            pass
        except Exception as exc:
            raise StoreUnavailable(f"removing {len(names)} images: {_reason(exc)}") from None

    async def read(self, name: str) -> tuple[int, str | None, AsyncIterator[bytes]] | None:
        """The object's size, ETag and bytes in chunks, or None when there is no such object."""
        import obstore

        try:
            result = await obstore.get_async(_client(self), name)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StoreUnavailable(f"reading {name}: {_reason(exc)}") from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in result.stream(min_chunk_size=READ_CHUNK):
                    yield bytes(chunk)
            except Exception as exc:
                raise StoreUnavailable(f"reading {name}: {_reason(exc)}") from None

        return result.meta["size"], result.meta["e_tag"], chunks()


@functools.cache
def _client(store: ObjectStore) -> S3Store:
    """One client (and its connections) per process and store; credentials from the AWS_* variables."""
    from obstore.store import S3Store

    config: dict[str, str] = {}
    if store.endpoint:
        config["endpoint"] = store.endpoint
    if store.region:
        config["region"] = store.region
    return S3Store.from_url(
        store.url, config=config,  # type: ignore[arg-type]  # a plain dict of S3Config's keys
        client_options={"allow_http": store.endpoint.startswith("http://"), "connect_timeout": CONNECT_TIMEOUT,
                        "timeout": REQUEST_TIMEOUT},
        retry_config={"max_retries": RETRIES, "retry_timeout": RETRY_WINDOW})


def image_store(settings: Settings) -> ImageStore:
    storage = settings.storage
    if storage.url:
        return ObjectStore(storage.url, storage.endpoint, storage.region)
    return FolderStore(str(settings.path("images")))
