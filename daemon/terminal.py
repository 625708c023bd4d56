"""What the client commands show a person: progress while a request runs, its summary, a status as a table.

Everything here formats the daemon's GET /status bodies; the command line (daemon.cli) fetches them.
"""

from __future__ import annotations

import os
import time
import unicodedata
from collections.abc import Callable, Iterable
from typing import IO, Any

from tqdm import tqdm

from daemon.eventlog.store import parse_iso

RUNNING = ("queued", "processing")


def shown(text: object) -> str:
    """Text from a CSV or an origin, safe to print: control characters (a terminal's escape sequences among
    them) are shown as `?`, so a product name cannot move the cursor or recolour the terminal."""
    return "".join("?" if unicodedata.category(c) in ("Cc", "Cf") else c for c in str(text))


def size(count: int | float) -> str:
    """Bytes for a person: 512 B, 48.2 KB, 3.1 MB (powers of 1000, as disks and networks count)."""
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def images_of(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [image for product in status.get("products", []) for image in product["images"]]


def totals(status: dict[str, Any]) -> dict[str, int]:
    """Counts and bytes over a status body that lists its products."""
    images = images_of(status)
    done = [i for i in images if i["status"] in ("compressed", "kept_original")]
    return {
        "compressed": sum(1 for i in images if i["status"] == "compressed"),
        "kept": sum(1 for i in images if i["status"] == "kept_original"),
        "failed": sum(1 for i in images if i["status"] == "failed"),
        "bytes_in": sum(i["bytes_in"] or 0 for i in done),
        "bytes_out": sum(i["bytes_out"] or 0 for i in done),
    }


def seconds_between(start: str | None, end: str | None) -> float | None:
    return parse_iso(end) - parse_iso(start) if start and end else None


def summary(status: dict[str, Any]) -> str:
    """One line for a finished request: what became of its images, the bytes saved and how long it took."""
    t = totals(status)
    saved = t["bytes_in"] - t["bytes_out"]
    share = f" ({saved / t['bytes_in']:.0%})" if t["bytes_in"] else ""
    took = seconds_between(status.get("created_at"), status.get("completed_at"))
    cancelled = status["progress"].get("cancelled", 0)
    parts = [f"{t['compressed']} compressed", f"{t['kept']} kept", f"{t['failed']} failed",
             *([f"{cancelled} cancelled"] if cancelled else []),
             f"{size(saved)} saved{share}", *([f"in {took:.1f} s"] if took is not None else [])]
    return f"{status['status']}: " + ", ".join(parts)


def _finished_count(status: dict[str, Any]) -> int:
    progress = status["progress"]
    return int(progress["done"] + progress["failed"])


def columns(out: IO[str]) -> int:
    """The terminal's width; 80 where it says it has none (a fresh pseudo-terminal), where tqdm would draw nothing."""
    try:
        return os.get_terminal_size(out.fileno()).columns or 80
    except OSError:
        return 80


def follow(poll: Callable[[], dict[str, Any]], interval: float, out: IO[str]) -> dict[str, Any]:
    """Poll a request's status until it finishes; a progress bar on a terminal, else a plain line at each
    change. Returns the last status."""
    status = poll()
    if out.isatty():
        with tqdm(total=status["progress"]["images"], unit="img", file=out, ncols=columns(out)) as bar:
            while True:
                bar.set_description(status["status"])
                bar.set_postfix(failed=status["progress"]["failed"], refresh=False)
                bar.update(_finished_count(status) - bar.n)
                if status["status"] not in RUNNING:
                    return status
                time.sleep(interval)
                status = poll()
    last = None
    while True:
        progress = status["progress"]
        line = (f"{status['request_id']} {status['status']}: {_finished_count(status)}/{progress['images']} images"
                f", {progress['failed']} failed")
        if line != last:
            print(line, file=out, flush=True)
            last = line
        if status["status"] not in RUNNING:
            return status
        time.sleep(interval)
        status = poll()


def table(rows: Iterable[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    """Columns padded to their widest cell."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def status_report(status: dict[str, Any]) -> str:
    """`imgpipe status ID`: a summary, then one row per image, its error below a failed one, then the webhooks."""
    progress, source = status["progress"], status["source"]
    t = totals(status)
    lines = [
        f"request   {status['request_id']} ({source['kind']} {shown(source['name'])})",
        f"status    {status['status']}",
        f"created   {status['created_at']}" + (f", completed {status['completed_at']}" if status["completed_at"]
                                                 else ""),
        f"images    {progress['images']}: {t['compressed']} compressed, {t['kept']} kept, {progress['failed']} "
        f"failed, {progress['pending']} pending" + (f", {progress['cancelled']} cancelled"
                                                    if progress.get("cancelled") else ""),
        f"bytes     {size(t['bytes_in'])} in, {size(t['bytes_out'])} out, {size(t['bytes_in'] - t['bytes_out'])} "
        "saved",
        "",
    ]
    rows: list[tuple[str, ...]] = []
    errors: dict[int, str] = {}
    for product in status.get("products", []):
        for image in product["images"]:
            if image["error"]:
                errors[len(rows)] = shown(image["error"])
            saved = (f"{1 - image['bytes_out'] / image['bytes_in']:.0%}" if image["bytes_in"] and
                     image["bytes_out"] is not None else "")
            rows.append((shown(product["serial"]), shown(product["product_name"]), shown(image["input_url"]),
                         image["status"], size(image["bytes_in"]) if image["bytes_in"] is not None else "",
                         size(image["bytes_out"]) if image["bytes_out"] is not None else "", saved))
    formatted = table(rows, ("serial", "product", "input url", "status", "in", "out", "saved"))
    lines.append(formatted[0])
    for index, line in enumerate(formatted[1:]):
        lines.append(line)
        if index in errors:
            lines.append(f"    error: {errors[index]}")
    for delivery in status.get("webhooks", []):
        lines.append(f"webhook   {shown(delivery['listener'])}: {delivery['state']} after "
                     f"{len(delivery['attempts'])} attempt(s)")
    return "\n".join(lines)
