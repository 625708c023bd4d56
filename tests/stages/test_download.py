"""Reading a server's Retry-After: a value that cannot be read is ignored, never an error."""

from __future__ import annotations

import email.utils
import time

import pytest

from daemon.stages.download import retry_after_seconds


@pytest.mark.parametrize(("value", "expected"), [
    ("120", 120.0),
    (" 7 ", 7.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: at once
    (None, None),
    ("", None),
    ("soon", None),
    ("\u00b2", None),  # a digit to str.isdigit, not to float()
    ("Mon, 01 Jan 2024 00:00:00 +99999999999999999999", None),  # overflows the date arithmetic
])
def test_retry_after_reads_seconds_and_dates_and_ignores_the_rest(value: str | None, expected: float | None) -> None:
    """Delta-seconds and HTTP dates are read; anything else is None (it used to raise, and the image was retried as a
    bug for ever, holding a download slot)."""
    assert retry_after_seconds(value) == expected


def test_retry_after_a_date_ahead_is_the_seconds_until_it() -> None:
    """An HTTP date a minute ahead reads as about sixty seconds."""
    ahead = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (retry_after_seconds(ahead) or 0) <= 60
