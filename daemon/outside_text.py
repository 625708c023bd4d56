"""Text from outside the daemon (file names, headers, JSON strings) made storable as UTF-8."""

from __future__ import annotations

SURROGATES = range(0xD800, 0xE000)


def storable(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD. Python decodes a file name or header that is not
    UTF-8 (a Latin-1 `März.csv`) with surrogate escapes, and JSON may spell `"\\ud800"`: neither can be encoded
    as UTF-8, so SQLite, the logs and the export CSV would all fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if ord(c) in SURROGATES else c for c in text)
    return text
