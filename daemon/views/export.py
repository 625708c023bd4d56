"""The export: the input CSV plus `Output Image Urls`, read from the status view; outbox/ on completion."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import structlog

from daemon.eventlog.follower import Follower
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import Event, ImageCompressed, RequestAccepted, RequestCompleted, RequestDeleted, names
from daemon.files import TEMP_FILES, remove_matching, write_atomic
from daemon.views.status import StatusImage, StatusRequest, image_url

log = structlog.get_logger("export")

HEADER = ("S. No.", "Product Name", "Input Image Urls", "Output Image Urls")
# Columns an export adds only when asked (?columns=), each image's value in input order like the output URLs.
EXTRA_COLUMNS = {"ssim": "SSIM", "quality": "Quality"}
FINISHED = ("completed", "completed_with_errors", "failed", "cancelled")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """Keep spreadsheets from running a cell as a formula (CSV injection)."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


class ExportImage(NamedTuple):
    product: int
    serial: str
    product_name: str
    input_url: str
    output_name: str | None
    ssim: float | None = None
    quality: int | None = None


Row = tuple[str, ...]


def rows_from_images(images: Iterable[ExportImage], images_url: str, extra: Sequence[str] = ()) -> list[Row]:
    """One row per product, output URLs in input order; a failed image keeps its place, empty. `extra` names
    EXTRA_COLUMNS to add, filled the same way."""
    rows: list[Row] = []
    for _, group in itertools.groupby(images, key=lambda i: i.product):
        product = list(group)
        rows.append((product[0].serial, product[0].product_name, ",".join(i.input_url for i in product),
                     ",".join(image_url(images_url, i.output_name) or "" for i in product),
                     *(",".join(_cell(getattr(i, column)) for i in product) for column in extra)))
    return rows


def _cell(value: float | int | None) -> str:
    return "" if value is None else str(value)


def export_rows(request_ids: Iterable[str], images_url: str, extra: Sequence[str] = ()) -> list[Row]:
    """The rows of finished requests, from the status view (reader thread)."""
    rows: list[Row] = []
    for request_id in request_ids:
        images = StatusImage.select().where(StatusImage.request_id == request_id).order_by(
            StatusImage.product, StatusImage.index)
        rows += rows_from_images((ExportImage(i.product, i.serial, i.product_name, i.input_url, i.output_name,
                                              i.ssim, i.quality) for i in images), images_url, extra)
    return rows


def stream_images(records: Sequence[RecordedEvent]) -> tuple[RequestAccepted, list[ExportImage]]:
    """The same images folded straight from a request's events (no view needed)."""
    accepted = records[0].event
    assert isinstance(accepted, RequestAccepted)
    outputs = {(r.event.product, r.event.index): r.event.name for r in records if isinstance(r.event, ImageCompressed)}
    images = [
        ExportImage(p, product.serial, product.product_name, url, outputs.get((p, i)))
        for p, product in enumerate(accepted.products) for i, url in enumerate(product.input_urls)
    ]
    return accepted, images


def to_csv(rows: Sequence[tuple[str, ...]], extra: Sequence[str] = ()) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow(HEADER + tuple(EXTRA_COLUMNS[column] for column in extra))
    writer.writerows([tuple(neutralise(c) for c in row) for row in rows])
    return buffer.getvalue()


def finished_request_ids() -> list[str]:
    query = StatusRequest.select(StatusRequest.request_id).where(StatusRequest.status.in_(FINISHED)).order_by(
        StatusRequest.completed_at, StatusRequest.request_id)
    return [r.request_id for r in query]


def outbox_name(request_id: str, accepted: RequestAccepted) -> str:
    """Inbox batches keep their file name, prefixed exactly like the archive copy; uploads are named by id. An
    inbox source name is its claim's file name (fitted and made UTF-8 there), so it fits here too."""
    if accepted.source == "inbox":
        return f"{request_id}--{Path(accepted.source_name).name or 'batch.csv'}"
    return f"{request_id}.csv"


class OutboxWriter(Follower):
    """On RequestCompleted, writes the export CSV to outbox/ (idempotent: same name, atomic)."""

    name = "export.outbox"
    types = names(RequestCompleted)
    concurrency = 4

    def __init__(self, eventlog: EventLog, outbox: Path, images_url: str) -> None:
        super().__init__(eventlog)
        self.outbox, self.images_url = outbox, images_url

    async def recover(self) -> None:
        """Temp files of writes that a crash cut short."""
        await asyncio.to_thread(remove_matching, self.outbox, TEMP_FILES)

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        records = await self.eventlog.read_stream(record.stream)
        if any(isinstance(r.event, RequestDeleted) for r in records):
            return ()  # deleted meanwhile: its outbox file must not come back
        accepted, images = stream_images(records)
        rows = rows_from_images(images, self.images_url)
        path = self.outbox / outbox_name(record.stream, accepted)
        data = to_csv(rows).encode("utf-8")
        await self.space.retry_while_full("outbox", lambda: asyncio.to_thread(write_atomic, path, data))
        log.info("outbox_written", request_id=record.stream, file=str(path), products=len(rows))
        return ()
