"""parse_csv: a Batch for a good file, otherwise every problem at once with its line and column."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.config import LimitSettings
from daemon.events import Product
from daemon.ingest.csvfile import NAME, SERIAL, URLS, Batch, Problem, parse_csv

HEADER = b"S. No.,Product Name,Input Image Urls\n"
LIMITS = LimitSettings()


def problems_of(data: bytes, limits: LimitSettings = LIMITS) -> list[tuple[int, str, str]]:
    """(line, column, reason) of every problem; fails if the file was accepted."""
    parsed = parse_csv(data, limits)
    assert isinstance(parsed, list), f"expected problems, got {parsed!r}"
    assert parsed, "a rejection must name at least one problem"
    return [(p.line, p.column, p.reason) for p in parsed]


def batch_of(data: bytes, limits: LimitSettings = LIMITS) -> Batch:
    parsed = parse_csv(data, limits)
    assert isinstance(parsed, Batch), f"expected a batch, got problems {[str(p) for p in parsed]}"
    return parsed


def test_sample_csv_is_accepted(helpers: Any) -> None:
    """The repository's sample.csv parses into two products with three URLs each, in file order."""
    batch = batch_of(helpers.sample_csv.read_bytes())
    assert [(p.serial, p.product_name, p.slug) for p in batch.products] == [("1", "SKU1", "1"), ("2", "SKU2", "2")]
    assert batch.products[0].input_urls == tuple(f"https://picsum.photos/id/{n}/1200/800.jpg" for n in (10, 11, 12))
    assert batch.products[1].input_urls == tuple(f"https://picsum.photos/id/{n}/1200/800.jpg" for n in (13, 14, 15))
    assert batch.image_count == 6


# (id, file, limits, expected [(line, column, reason fragment)])
REJECTED: list[tuple[str, bytes, dict[str, int], list[tuple[int, str, str]]]] = [
    ("empty file", b"", {}, [(1, "", "empty file")]),
    ("only blank lines", b"\n  \r\n\n", {}, [(1, "", "empty file")]),
    ("only a UTF-8 BOM", b"\xef\xbb\xbf", {}, [(1, "", "empty file")]),
    ("BOM and a blank line", b"\xef\xbb\xbf\r\n", {}, [(1, "", "empty file")]),
    ("header only", HEADER, {}, [(1, "", "no data rows after the header")]),
    ("no header: first line is data", b"1,SKU1,https://a.example/1.jpg\n", {},
     [(1, SERIAL, "missing column"), (1, NAME, "missing column"), (1, URLS, "missing column")]),
    ("wrong header", b"Serial,Name,URLs\n1,SKU1,https://a.example/1.jpg\n", {},
     [(1, SERIAL, "missing column"), (1, NAME, "missing column"), (1, URLS, "missing column")]),
    ("one header column misspelt", b"S. No.,Product,Input Image Urls\n1,SKU1,https://a.example/1.jpg\n", {},
     [(1, NAME, "missing column (header is 'S. No.,Product,Input Image Urls'")]),
    ("not UTF-8 (Latin-1 e acute on line 3)",
     HEADER + b"1,SKU1,https://a.example/1.jpg\n2,Caf\xe9,https://a.example/2.jpg\n", {},
     [(3, "", "not valid UTF-8 (byte 0xe9")]),
    ("NUL bytes on line 2", HEADER + b"1,SK\x00U1,https://a.example/1.jpg\n", {},
     [(2, "", "contains NUL bytes")]),
    ("UTF-16 file", "S. No.,Product Name,Input Image Urls\n1,SKU1,https://a.example/1.jpg\n".encode("utf-16"), {},
     [(1, "", "contains NUL bytes")]),
    ("duplicate serials name both lines",
     HEADER + b"7,SKU1,https://a.example/1.jpg\n8,SKU2,https://a.example/2.jpg\n7,SKU3,https://a.example/3.jpg\n",
     {}, [(4, SERIAL, "duplicate serial number '7' (first on line 2)")]),
    ("missing serial", HEADER + b" ,SKU1,https://a.example/1.jpg\n", {}, [(2, SERIAL, "missing serial number")]),
    ("missing product name", HEADER + b"1,  ,https://a.example/1.jpg\n", {}, [(2, NAME, "missing product name")]),
    ("empty URL cell", HEADER + b"1,SKU1,\n", {}, [(2, URLS, "no image URL")]),
    ("URL cell of only commas", HEADER + b'1,SKU1,", ,"\n', {}, [(2, URLS, "no image URL")]),
    ("ftp URL", HEADER + b"1,SKU1,ftp://files.example/1.jpg\n", {},
     [(2, URLS, "only http and https URLs are accepted, got 'ftp://files.example/1.jpg'")]),
    ("URL without a host", HEADER + b"1,SKU1,https:///1.jpg\n", {}, [(2, URLS, "URL has no host")]),
    ("URL with a bad port", HEADER + b"1,SKU1,https://a.example:99999/1.jpg\n", {}, [(2, URLS, "malformed URL")]),
    ("URL with an empty host label", HEADER + b"1,SKU1,https://cdn..shop.example/1.jpg\n", {},
     [(2, URLS, "URL has an invalid host name (a label is empty or longer than 63 characters)")]),
    ("URL with a host label over 63 characters", HEADER + b"1,SKU1,https://" + b"a" * 64 + b".example/1.jpg\n", {},
     [(2, URLS, "URL has an invalid host name")]),
    ("URL with whitespace inside", HEADER + b'1,SKU1,"https://a.example/a b.jpg"\n', {},
     [(2, URLS, "URL contains whitespace")]),
    ("URL over max_url_length", HEADER + b"1,SKU1,https://a.example/" + b"x" * 100 + b".jpg\n",
     {"max_url_length": 50}, [(2, URLS, "URL longer than 50 characters")]),
    ("too many URLs in one cell", HEADER + b'1,SKU1,"https://a.example/1.jpg,https://a.example/2.jpg,https://a.example/3.jpg"\n',
     {"max_urls_per_row": 2}, [(2, URLS, "3 URLs, the limit is 2")]),
    ("too few cells", HEADER + b"1,SKU1\n", {}, [(2, "", "expected 3 cells, found 2")]),
    ("unterminated quote", HEADER + b'1,SKU1,https://a.example/1.jpg\n2,"SKU2,https://a.example/2.jpg\n3,SKU3,https://a.example/3.jpg\n',
     {}, [(3, "", "malformed CSV: unexpected end of data")]),
    ("text after a closing quote", HEADER + b'1,SKU1,https://a.example/1.jpg\n2,"SKU2"x,https://a.example/2.jpg\n',
     {}, [(3, "", "malformed CSV: ',' expected after '\"'")]),
    ("too many rows for max_rows", HEADER + b"1,A,https://a.example/1.jpg\n2,B,https://a.example/2.jpg\n3,C,https://a.example/3.jpg\n",
     {"max_rows": 2}, [(4, "", "too many rows: the limit is 2")]),
    ("a cell over max_cell_bytes", HEADER + b"1,SKU1,https://a.example/1.jpg\n2," + b"N" * 200 + b",https://a.example/2.jpg\n",
     {"max_cell_bytes": 100}, [(3, "", "a cell is larger than 100 bytes")]),
]


@pytest.mark.parametrize(("data", "limits", "expected"), [case[1:] for case in REJECTED],
                         ids=[case[0] for case in REJECTED])
def test_rejected_files_name_each_problem(data: bytes, limits: dict[str, int],
                                          expected: list[tuple[int, str, str]]) -> None:
    """Each kind of bad file is rejected with exactly the expected problems, by line and column."""
    found = problems_of(data, LimitSettings(**limits))
    assert [(line, column) for line, column, _ in found] == [(line, column) for line, column, _ in expected]
    for (_, _, reason), (_, _, fragment) in zip(found, expected):
        assert fragment in reason


def test_every_problem_is_reported_at_once() -> None:
    """One file with several bad rows gets one problem per fault, in file order, with line and column."""
    data = (
        HEADER
        + b"1,SKU1,https://a.example/1.jpg\n"       # line 2: fine
        + b"2,,ftp://a.example/2.jpg\n"             # line 3: no name, bad scheme
        + b"\n"                                     # line 4: blank, skipped
        + b'3,"SKU3\nsecond line",\n'               # lines 5-6: a quoted name over two lines, no URL
        + b"1,SKU4,https://a.example/4.jpg\n"       # line 7: duplicate serial of line 2
        + b"5,SKU5\n"                               # line 8: a cell missing
    )
    assert [(line, column) for line, column, _ in problems_of(data)] == [
        (3, NAME), (3, URLS), (5, URLS), (7, SERIAL), (8, ""),
    ]
    assert [str(p) for p in parse_csv(data, LIMITS)] == [  # type: ignore[union-attr]
        "line 3, column 'Product Name': missing product name",
        "line 3, column 'Input Image Urls': only http and https URLs are accepted, got 'ftp://a.example/2.jpg'",
        "line 5, column 'Input Image Urls': no image URL",
        "line 7, column 'S. No.': duplicate serial number '1' (first on line 2)",
        "line 8: expected 3 cells, found 2",
    ]


def test_bom_and_odd_header_case_and_whitespace_are_accepted() -> None:
    """A UTF-8 BOM, CRLF line ends, odd case, extra spaces and an extra column in the header are fine."""
    data = (
        b"\xef\xbb\xbf  s. NO. ,PRODUCT   name, input image URLS ,Notes\r\n"
        b" 1 , SKU1 , https://a.example/1.jpg ,ignored\r\n"
    )
    batch = batch_of(data)
    assert batch.products == (Product(serial="1", product_name="SKU1", slug="1",
                                      input_urls=("https://a.example/1.jpg",)),)


def test_columns_in_another_order_are_found_by_name() -> None:
    """Columns are matched by header name, not position."""
    data = b"Input Image Urls,S. No.,Product Name\n\"https://a.example/1.jpg,https://a.example/2.jpg\",9,Nine\n"
    (product,) = batch_of(data).products
    assert (product.serial, product.product_name) == ("9", "Nine")
    assert product.input_urls == ("https://a.example/1.jpg", "https://a.example/2.jpg")


def test_unquoted_url_list_spilling_into_extra_cells_is_accepted() -> None:
    """An unquoted comma-separated URL list in the last column is read as one URL cell."""
    data = HEADER + b"1,SKU1,https://a.example/1.jpg,https://a.example/2.jpg, https://a.example/3.jpg\n"
    (product,) = batch_of(data).products
    assert product.input_urls == ("https://a.example/1.jpg", "https://a.example/2.jpg", "https://a.example/3.jpg")


def test_blank_lines_and_stray_commas_in_urls_are_ignored() -> None:
    """Blank rows are skipped and empty entries in a URL list dropped."""
    data = HEADER + b"\n1,SKU1,\"https://a.example/1.jpg,,\"\n,,\n2,SKU2,https://a.example/2.jpg\n\n"
    batch = batch_of(data)
    assert [p.input_urls for p in batch.products] == [("https://a.example/1.jpg",), ("https://a.example/2.jpg",)]


def test_max_rows_rows_are_accepted() -> None:
    """Exactly max_rows data rows is within the limit."""
    data = HEADER + b"1,A,https://a.example/1.jpg\n2,B,https://a.example/2.jpg\n"
    assert len(batch_of(data, LimitSettings(max_rows=2)).products) == 2


def test_slugs_are_unique_within_a_batch() -> None:
    """Serials that clean up to the same file-name slug still get distinct slugs (they name output files)."""
    serials = ["x-2", "x", "x!", "x?", "x-3", "A/B", "A B"]
    data = HEADER + b"".join(f"{s},P{i},https://a.example/{i}.jpg\n".encode() for i, s in enumerate(serials))
    slugs = [p.slug for p in batch_of(data).products]
    assert slugs[:2] == ["x-2", "x"]
    assert all(slug.replace("-", "").replace("_", "").isalnum() for slug in slugs)
    assert len(set(slugs)) == len(slugs), slugs


def test_problem_text_names_line_and_column() -> None:
    """A problem reads 'line N, column 'C': reason', or 'line N: reason' when no column applies."""
    assert str(Problem(4, NAME, "missing product name")) == "line 4, column 'Product Name': missing product name"
    assert str(Problem(1, "", "empty file")) == "line 1: empty file"
