"""The list of requests (GET /requests, the page, `imgpipe list`): newest first, one page at a time, from the status
view's tables. Run these through EventLog.query, like every view read."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.views.status import StatusImage, StatusRequest, compression, progress

STATUSES = ("queued", "processing", "completed", "completed_with_errors", "failed", "cancelled")


class BadCursor(ValueError):
    """A `before` cursor this daemon did not hand out."""


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the last request shown (newest first by creation time, then id)."""

    created_at: str
    request_id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at, self.request_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created_at, request_id = json.loads(raw)
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            raise BadCursor(f"not a cursor from a 'next' link: {text!r}") from None
        if not isinstance(created_at, str) or not isinstance(request_id, str):
            raise BadCursor(f"not a cursor from a 'next' link: {text!r}")
        return cls(created_at, request_id)


def recent_requests(public_url: str, limit: int, status: str | None = None,
                    before: Cursor | None = None) -> dict[str, Any]:
    """One page of request summaries, newest first, and the cursor of the next page (None after the last)."""
    query = StatusRequest.select()
    if status is not None:
        query = query.where(StatusRequest.status == status)
    if before is not None:  # where() again ANDs the conditions
        query = query.where(
            (StatusRequest.created_at < before.created_at)
            | ((StatusRequest.created_at == before.created_at) & (StatusRequest.request_id < before.request_id)))
    rows = list(query.order_by(StatusRequest.created_at.desc(), StatusRequest.request_id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    following = Cursor(rows[-1].created_at, rows[-1].request_id).encode() if more else None
    return {"requests": summaries_of(rows, public_url), "next": following}


def request_summaries(request_ids: Sequence[str], public_url: str) -> dict[str, dict[str, Any] | None]:
    """The summary of each request, None for one that is gone (deleted)."""
    rows = StatusRequest.select().where(StatusRequest.request_id.in_(list(request_ids)))
    found = {s["request_id"]: s for s in summaries_of(list(rows), public_url)}
    return {request_id: found.get(request_id) for request_id in request_ids}


def summaries_of(rows: Sequence[StatusRequest], public_url: str) -> list[dict[str, Any]]:
    return [{
        "request_id": r.request_id,
        "status": r.status,
        "source": {"kind": r.source, "name": r.source_name},
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "completed_at": r.completed_at,
        "progress": progress(r),
        "compression": compression(r.request_id),
        "status_url": f"{public_url}/status/{r.request_id}",
    } for r in rows]


def input_url(request_id: str, product: int, index: int) -> str | None:
    """Where one image of a request was downloaded from, or None when there is no such image."""
    row = StatusImage.select(StatusImage.input_url).where(
        (StatusImage.request_id == request_id) & (StatusImage.product == product)
        & (StatusImage.index == index)).tuples().first()
    return None if row is None else str(row[0])
