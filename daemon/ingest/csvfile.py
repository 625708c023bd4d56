"""Parse and validate an input CSV: a Batch, or every problem at once. Pure: no I/O.

Format: header `S. No.,Product Name,Input Image Urls` (case and whitespace ignored, a UTF-8 BOM is
fine, extra columns ignored); the URL cell holds one or more comma-separated http(s) URLs.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from yarl import URL

from daemon.config import LimitSettings
from daemon.events import Product
from daemon.network import INVALID_HOST_NAME

SERIAL, NAME, URLS = "S. No.", "Product Name", "Input Image Urls"
COLUMNS = (SERIAL, NAME, URLS)


@dataclass(frozen=True)
class Problem:
    line: int
    column: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", column {self.column!r}" if self.column else "")
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class Batch:
    products: tuple[Product, ...]

    @property
    def image_count(self) -> int:
        return sum(len(p.input_urls) for p in self.products)


def _normal(name: str) -> str:
    return "".join(name.split()).lower()


def check_url(url: str, limits: LimitSettings) -> str | None:
    """Why `url` is not an acceptable image or webhook URL, or None."""
    if len(url) > limits.max_url_length:
        return f"URL longer than {limits.max_url_length} characters"
    if any(c.isspace() for c in url):
        return f"URL contains whitespace: {url!r}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        return f"malformed URL {url!r}: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"only http and https URLs are accepted, got {url!r}"
    if not parts.hostname:
        return f"URL has no host: {url!r}"
    try:
        # The host as the HTTP client will resolve it: the resolver's IDNA encoding refuses an empty label
        # (`cdn..shop.com`) or one over 63 characters, an error no download could ever get past.
        (URL(url).raw_host or "").encode("idna")
    except UnicodeError:
        return f"URL has an {INVALID_HOST_NAME}: {url!r}"
    except ValueError as exc:
        return f"malformed URL {url!r}: {exc}"
    return None


def slug(serial: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", serial).strip("-")[:40] or "item"


def parse_csv(data: bytes, limits: LimitSettings) -> Batch | list[Problem]:
    empty = [Problem(1, "", "empty file: expected a header line " + ",".join(COLUMNS))]
    if not data.strip():
        return empty
    if (nul := data.find(b"\x00")) >= 0:
        # Python's csv module accepts NUL since 3.11, so look for it here (UTF-16 files are full of it).
        return [Problem(data[:nul].count(b"\n") + 1, "", "contains NUL bytes: this is not a text CSV file")]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return [Problem(line, "", f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the file as UTF-8")]
    if not text.strip():  # only a UTF-8 BOM (Excel's empty "CSV UTF-8") and blank lines
        return empty
    # The csv module's limit is process-wide and counts characters; the byte limit is checked per row below.
    csv.field_size_limit(max(csv.field_size_limit(), limits.max_cell_bytes))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    problems: list[Problem] = []
    products: list[Product] = []
    line = 1  # where the row being read starts
    try:
        header = next(reader, None)
        if header is None:  # never raise StopIteration here: asyncio.to_thread would hang on it
            return empty
        index = {_normal(name): i for i, name in reversed(list(enumerate(header)))}
        missing = [c for c in COLUMNS if _normal(c) not in index]
        if missing:
            found = ",".join(header)[:200]
            return [Problem(1, c, f"missing column (header is {found!r}, expected {','.join(COLUMNS)})") for c in missing]
        at = {c: index[_normal(c)] for c in COLUMNS}
        urls_last = at[URLS] == len(header) - 1
        seen: dict[str, int] = {}
        slugs: set[str] = set()
        line = reader.line_num + 1
        rows = 0
        for cells in reader:
            start, line = line, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            rows += 1  # valid or not: a flood of bad rows is refused by count too
            if rows > limits.max_rows:
                problems.append(Problem(start, "", f"too many rows: the limit is {limits.max_rows}"))
                break
            if any(len(c) * 4 > limits.max_cell_bytes and len(c.encode()) > limits.max_cell_bytes for c in cells):
                problems.append(Problem(start, "", f"a cell is larger than {limits.max_cell_bytes} bytes"))
                continue
            if len(cells) > len(header) and urls_last:
                # An unquoted URL list spills into extra cells; they all belong to the last column.
                cells = [*cells[: len(header) - 1], ",".join(cells[len(header) - 1:])]
            if len(cells) < len(header):
                problems.append(Problem(start, "", f"expected {len(header)} cells, found {len(cells)}"))
                continue
            if len(cells) > len(header):
                problems.append(Problem(start, "", f"expected {len(header)} cells, found {len(cells)} (quote cells that contain commas)"))
                continue
            serial, name, cell = (cells[at[c]].strip() for c in COLUMNS)
            row_problems: list[Problem] = []
            if not serial:
                row_problems.append(Problem(start, SERIAL, "missing serial number"))
            elif serial in seen:
                row_problems.append(Problem(start, SERIAL, f"duplicate serial number {serial!r} (first on line {seen[serial]})"))
            else:
                seen[serial] = start
            if not name:
                row_problems.append(Problem(start, NAME, "missing product name"))
            urls = [u.strip() for u in cell.split(",") if u.strip()]
            if not urls:
                row_problems.append(Problem(start, URLS, "no image URL"))
            elif len(urls) > limits.max_urls_per_row:
                row_problems.append(Problem(start, URLS, f"{len(urls)} URLs, the limit is {limits.max_urls_per_row}"))
            for url in urls:
                if reason := check_url(url, limits):
                    row_problems.append(Problem(start, URLS, reason))
            if row_problems:
                problems.extend(row_problems)
                continue
            name_slug = slug(serial)
            base, n = name_slug, len(products)
            while name_slug in slugs:  # the suffixed slug may itself be taken (serials "x-2", "x", "x!")
                name_slug, n = f"{base}-{n}", n + 1
            slugs.add(name_slug)
            products.append(Product(serial=serial, product_name=name, slug=name_slug, input_urls=tuple(urls)))
    except csv.Error as exc:
        reason = str(exc)
        if "field larger than field limit" in reason:
            reason = f"a cell is larger than {limits.max_cell_bytes} bytes"
        elif "NUL" in reason:
            reason = "contains NUL bytes: this is not a text CSV file"
        else:
            reason = f"malformed CSV: {reason} (check the quoting of the row starting here)"
        problems.append(Problem(line, "", reason))
    if not problems and not products:
        problems.append(Problem(1, "", "no data rows after the header"))
    return problems or Batch(tuple(products))
