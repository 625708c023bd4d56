"""Where a finished request's CSV lands in the outbox."""

from __future__ import annotations

import pytest

from daemon.events import RequestAccepted
from daemon.ingest.inbox import fitted_name
from daemon.views.export import outbox_name

REQUEST_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("name", [
    "batch (1).csv",
    "Produkte M\u00e4rz.csv",
    "M\ufffdrz.csv",
    "P" * 146 + ".csv",
    fitted_name("L" * 236 + ".csv"),
])
def test_an_inbox_batch_lands_under_its_own_name_like_its_archive_copy(name: str) -> None:
    """The outbox file is `<request_id>--<name>` with the source name untouched: spaces, brackets, accents, a long
    name and one shortened at the claim all keep their characters and their .csv."""
    accepted = RequestAccepted(source="inbox", source_name=name, products=())
    assert outbox_name(REQUEST_ID, accepted) == f"{REQUEST_ID}--{name}"
    assert len(outbox_name(REQUEST_ID, accepted).encode()) <= 255


def test_an_upload_lands_under_its_request_id() -> None:
    """An upload's outbox file is named after its request id alone, whatever the uploaded file was called."""
    accepted = RequestAccepted(source="upload", source_name="../../etc/passwd", products=())
    assert outbox_name(REQUEST_ID, accepted) == f"{REQUEST_ID}.csv"
