"""The event catalogue: what happened to a request, as frozen past-tense facts.

Every event lives in the stream of one request (stream id = request id). Images are named by the
position of their product in the CSV (`product`, 0-based) and their place in its URL cell (`index`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self


@dataclass(frozen=True)
class Event:
    CATALOGUE: ClassVar[dict[str, type[Event]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Event.CATALOGUE[cls.__name__] = cls

    @property
    def type(self) -> str:
        return type(self).__name__

    @property
    def addressee(self) -> str:
        """The one daemon (cluster node) this event is for, when only one daemon acts on it; "" for all."""
        return ""

    @property
    def announced_as(self) -> str:
        """Its type, with its addressee when it has one (`ImageDownloaded@b`): what an append announces."""
        return f"{self.type}@{self.addressee}" if self.addressee else self.type

    def to_json(self) -> str:
        # vars(), not dataclasses.asdict: events are flat and frozen, so asdict's deep copy is pure cost.
        return json.dumps(vars(self), default=_fields, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


def _fields(value: object) -> dict[str, Any]:
    """json.dumps' fallback for the dataclasses nested in an event (a request's products)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return vars(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def names(*kinds: type[Event]) -> frozenset[str]:
    """The type names the log stores for these event classes (a class's name is its stored type: keep it)."""
    return frozenset(kind.__name__ for kind in kinds)


def decode(type_name: str, data: str) -> Event:
    return Event.CATALOGUE[type_name].from_data(json.loads(data))


@dataclass(frozen=True)
class Product:
    serial: str
    product_name: str
    slug: str  # the serial made safe for file names, unique within the request
    input_urls: tuple[str, ...]


@dataclass(frozen=True)
class ImageEvent(Event):
    product: int
    index: int


@dataclass(frozen=True)
class RequestAccepted(Event):
    source: str  # "upload" | "inbox"
    source_name: str  # the uploaded or inbox file name
    products: tuple[Product, ...]
    webhook_url: str = ""
    idempotency_key: str = ""
    body_sha256: str = ""
    node: str = ""  # the daemon that took it in (daemon.cluster), which writes its outbox file; "": the only one

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Self:
        products = tuple(
            Product(**{**p, "input_urls": tuple(p["input_urls"])}) for p in data.pop("products")
        )
        return cls(products=products, **data)

    @property
    def image_count(self) -> int:
        return sum(len(p.input_urls) for p in self.products)


@dataclass(frozen=True)
class ImageRequested(ImageEvent):
    url: str
    stem: str  # output file name without extension: <request_id>_<product slug>_<index>
    round: int = 0  # 0 when the request opened; n for its n-th retry (each round has its own attempt budget)


@dataclass(frozen=True)
class ImageRequeued(ImageRequested):
    """The image is to be downloaded again: a retry of the request, or its downloaded body was lost."""

    reason: str = ""


@dataclass(frozen=True)
class ImageDownloadRetried(ImageEvent):
    attempt: int
    error: str
    retry_in: float
    round: int = 0


@dataclass(frozen=True)
class ImageDownloaded(ImageEvent):
    stem: str
    bytes: int
    attempts: int
    node: str = ""  # the daemon whose working folder holds the body (daemon.cluster); "": the only one
    item: int = 0  # the position of the ImageRequested/ImageRequeued its claim is for (daemon.eventlog.claims)

    @property
    def addressee(self) -> str:
        return self.node  # only its node's compress stage takes it


@dataclass(frozen=True)
class Compressed:
    """What the codec wrote for one image (daemon.stages.codec returns it; ImageCompressed records it)."""

    name: str
    format: str
    width: int
    height: int
    bytes_in: int
    bytes_out: int
    kept_original: bool
    quality: int | None
    note: str
    # SSIM against the decoded original (daemon.stages.similarity); None: not scored. Keyword-only, so that the
    # image's own fields may follow it, and defaulted, so that events recorded before it decode.
    ssim: float | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class ImageCompressed(ImageEvent, Compressed):
    pass


@dataclass(frozen=True)
class ImageFailed(ImageEvent):
    stage: str  # "download" | "compress"
    error: str
    attempts: int = 0  # download attempts made, when the download failed


@dataclass(frozen=True)
class RequestCompleted(Event):
    """The request reached a final status; after a retry it completes again, with a completion of its own."""

    status: str  # "completed" | "completed_with_errors" | "failed" | "cancelled"
    images: int
    done: int
    failed: int


@dataclass(frozen=True)
class RequestCancelRequested(Event):
    """Someone asked to stop the request: images not started are skipped, the request completes `cancelled`."""


@dataclass(frozen=True)
class RequestRetried(Event):
    """Round `round` of a finished request: its failed `images` ((product, index) pairs) are tried again."""

    round: int
    images: tuple[tuple[int, int], ...]

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Self:
        return cls(round=data["round"], images=tuple((p, i) for p, i in data["images"]))


@dataclass(frozen=True)
class RequestDeleted(Event):
    """The request's files are to be removed and the views forget it."""




@dataclass(frozen=True)
class WebhookQueued(Event):
    """A message is due to one listener; `round` 0 is the first delivery, each redelivery adds one."""

    message_id: str
    listener: str
    round: int = 0


@dataclass(frozen=True)
class WebhookAttempted(Event):
    message_id: str
    listener: str
    round: int
    attempt: int
    outcome: str  # "delivered" | "retrying" | "failed" | "gone"
    status_code: int | None
    error: str
    latency_ms: float
    retry_in: float | None = None


@dataclass(frozen=True)
class WebhookRedeliveryRequested(Event):
    message_id: str


@dataclass(frozen=True)
class NotificationReceived(Event):
    webhook_id: str
    verified: bool
    kind: str  # "classic" | "request.completed"
    status: str
    payload: dict[str, object]


IMAGE_TERMINAL = names(ImageCompressed, ImageFailed)
