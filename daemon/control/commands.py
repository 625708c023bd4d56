"""What a user may ask of a recorded request: retry its failed images, cancel it, delete it.

Each decides from the request's events and appends its own at the version it read (EventLog.decide), so two
commands at once are decided one after the other. A command that cannot be carried out raises
Refused, which names the HTTP status and says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import (
    Event,
    ImageCompressed,
    ImageEvent,
    ImageFailed,
    ImageRequeued,
    RequestAccepted,
    RequestCancelRequested,
    RequestCompleted,
    RequestDeleted,
    RequestRetried,
    names,
)
from daemon.ingest.accept import image_stem

# What the commands read of a stream: enough to know its state and its failed images, not every event.
STATE_TYPES = names(RequestAccepted, ImageCompressed, ImageFailed, ImageRequeued, RequestCompleted, RequestRetried,
                    RequestCancelRequested, RequestDeleted)
# Cancel needs no image: it reads only these, so the image events of a busy request do not make it decide again.
RUNNING_TYPES = names(RequestAccepted, RequestCompleted, RequestRetried, RequestCancelRequested, RequestDeleted)


class Refused(Exception):
    """The command cannot be carried out: `status` is the HTTP status to answer, the message says why."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error = status, error


@dataclass(frozen=True)
class RequestState:
    """A request as the commands see it, folded from its events."""

    accepted: RequestAccepted
    completion: RequestCompleted | None  # the last one, unless a retry opened the request again
    failed: tuple[tuple[int, int], ...]  # images whose last outcome is a failure
    rounds: int
    cancel_requested: RecordedEvent | None


def request_state(request_id: str, records: Sequence[RecordedEvent]) -> RequestState:
    """The request's state; Refused (404) for a request that was never recorded or is deleted."""
    if not records or any(isinstance(r.event, RequestDeleted) for r in records):
        raise Refused(404, "unknown_request", f"no request with id {request_id!r}")
    accepted = records[0].event
    assert isinstance(accepted, RequestAccepted)
    completion: RequestCompleted | None = None
    outcome: dict[tuple[int, int], bool] = {}  # image -> failed?
    rounds = 0
    cancel_requested = None
    for record in records:
        event = record.event
        if isinstance(event, ImageEvent):
            image = (event.product, event.index)
            if isinstance(event, ImageRequeued):
                outcome.pop(image, None)
            elif isinstance(event, ImageFailed | ImageCompressed):
                outcome[image] = isinstance(event, ImageFailed)
        elif isinstance(event, RequestCompleted):
            completion = event
        elif isinstance(event, RequestRetried):
            completion, rounds = None, rounds + 1
        elif isinstance(event, RequestCancelRequested):
            cancel_requested = record
    failed = tuple(sorted(image for image, is_failed in outcome.items() if is_failed))
    return RequestState(accepted, completion, failed, rounds, cancel_requested)


async def retry(eventlog: EventLog, request_id: str) -> tuple[int, RequestRetried]:
    """Open a finished request's failed images again for a new round; the last position and the RequestRetried."""
    def decide(records: list[RecordedEvent]) -> tuple[list[Event], RequestRetried]:
        state = request_state(request_id, records)
        if state.completion is None:
            raise Refused(409, "not_finished", f"request {request_id} is still running; retry it once it has finished")
        if state.completion.status == "cancelled":
            raise Refused(409, "cancelled", f"request {request_id} was cancelled; upload the CSV again to run it")
        if not state.failed:
            raise Refused(409, "nothing_failed", f"request {request_id} has no failed image to retry")
        retried = RequestRetried(round=state.rounds + 1, images=state.failed)
        products = state.accepted.products
        requeued = [ImageRequeued(product=p, index=i, url=products[p].input_urls[i],
                                  stem=image_stem(request_id, products[p], i), round=retried.round,
                                  reason=f"retry round {retried.round}")
                    for p, i in state.failed]
        return [retried, *requeued], retried

    return await eventlog.decide(request_id, STATE_TYPES, decide)


async def cancel(eventlog: EventLog, request_id: str) -> int:
    """Ask a running request to stop; the position of the request to cancel (the earlier one if it was asked
    before)."""
    def decide(records: list[RecordedEvent]) -> tuple[list[Event], int | None]:
        state = request_state(request_id, records)
        if state.completion is not None:
            raise Refused(409, "already_finished",
                          f"request {request_id} has already finished ({state.completion.status}); nothing to cancel")
        if state.cancel_requested is not None:
            return [], state.cancel_requested.position
        return [RequestCancelRequested()], None

    position, earlier = await eventlog.decide(request_id, RUNNING_TYPES, decide)
    return earlier or position


async def delete(eventlog: EventLog, request_id: str) -> int:
    """Record the deletion of a finished request; its position."""
    def decide(records: list[RecordedEvent]) -> tuple[list[Event], None]:
        if request_state(request_id, records).completion is None:
            raise Refused(409, "not_finished",
                          f"request {request_id} is still running; cancel it first, then delete it")
        return [RequestDeleted()], None

    position, _ = await eventlog.decide(request_id, STATE_TYPES, decide)
    return position


async def cancelled_request_ids(eventlog: EventLog) -> list[str]:
    """The requests whose images must not run: cancelled (and not retried since) or deleted."""
    stopped: set[str] = set()
    for record in await eventlog.read_after(0, names(RequestCancelRequested, RequestRetried, RequestDeleted), limit=2**62):
        (stopped.discard if isinstance(record.event, RequestRetried) else stopped.add)(record.stream)
    return sorted(stopped)
