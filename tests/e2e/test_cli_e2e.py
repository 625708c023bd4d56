"""The `imgpipe` client commands as a person runs them, against the real daemon and a real origin."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import termios
import threading
import urllib.request
from pathlib import Path
from typing import Any

from daemon.testing import Origin, clean_environment, imgpipe_command, jpeg_bytes, photo

SUMMARY = re.compile(r"^(\w+): (\d+) compressed, (\d+) kept, (\d+) failed, (?:(\d+) cancelled, )?"
                     r"[\d.]+ [KMG]?B saved(?: \(\d+%\))?, in [\d.]+ s$")
FILES = {"photo.jpg": jpeg_bytes(photo(640, 480, seed=31)), "low.jpg": jpeg_bytes(photo(320, 240, seed=32), 30)}


def write_csv(folder: Path, rows: list[str], name: str = "batch.csv") -> Path:
    path = folder / name
    path.write_text("S. No.,Product Name,Input Image Urls\n" + "".join(f"{row}\n" for row in rows), encoding="utf-8")
    return path


async def run(daemon: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """`imgpipe ARGS` against the daemon, on a thread: the origin serves on this test's loop meanwhile."""
    return await asyncio.to_thread(daemon.cli, "--config", str(daemon.client_config), *args)


async def test_submit_wait_prints_progress_lines_then_the_summary_and_exits_by_outcome(daemon: Any,
                                                                                       tmp_path: Path) -> None:
    """Without a terminal, `submit --wait` prints plain progress lines, then a summary; 0 completed, 3 with errors,
    4 failed."""
    async with Origin(FILES) as origin:
        good = write_csv(tmp_path, [f'1,Lamp,"{origin.url}/img/photo.jpg,{origin.url}/img/low.jpg"'], "good.csv")
        mixed = write_csv(tmp_path, [f"1,Lamp,{origin.url}/img/photo.jpg", f"2,Desk,{origin.url}/code/404"],
                          "mixed.csv")
        bad = write_csv(tmp_path, [f'1,Desk,"{origin.url}/code/404,{origin.url}/code/410"'], "bad.csv")
        outcomes = {}
        for path in (good, mixed, bad):
            outcomes[path.stem] = await run(daemon, "submit", str(path), "--wait", "--interval", "0.05")

    completed = outcomes["good"]
    assert completed.returncode == 0, completed.stderr
    request_id, summary = completed.stdout.splitlines()
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    found = SUMMARY.match(summary)
    assert found is not None, summary
    assert found.groups()[:4] == ("completed", "1", "1", "0")
    progress = completed.stderr.splitlines()
    assert progress[-1] == f"{request_id} completed: 2/2 images, 0 failed"
    assert all(line.startswith(f"{request_id} ") for line in progress)  # lines, not a bar's carriage returns
    assert "\r" not in completed.stderr

    with_errors = outcomes["mixed"]
    assert with_errors.returncode == 3, with_errors.stderr
    found = SUMMARY.match(with_errors.stdout.splitlines()[1])
    assert found is not None and found.groups()[:4] == ("completed_with_errors", "1", "0", "1")

    failed = outcomes["bad"]
    assert failed.returncode == 4, failed.stderr
    found = SUMMARY.match(failed.stdout.splitlines()[1])
    assert found is not None and found.groups()[:4] == ("failed", "0", "0", "2")


def submit_waiting(daemon: Any, csv: Path) -> subprocess.Popen[str]:
    """`imgpipe submit CSV --wait` started, its output to read as it comes."""
    return subprocess.Popen([*imgpipe_command(), "--config", str(daemon.client_config), "submit", str(csv), "--wait",
                             "--interval", "0.05"], env=clean_environment(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


async def test_submit_wait_exits_5_when_the_request_is_cancelled(daemon: Any, tmp_path: Path) -> None:
    """A request cancelled while `submit --wait` follows it ends the command with status 5 and a summary."""
    async with Origin(FILES) as origin:
        waiting = submit_waiting(daemon, write_csv(tmp_path, [f"1,Lamp,{origin.url}/stall"]))
        try:
            assert waiting.stdout is not None
            request_id = (await asyncio.to_thread(waiting.stdout.readline)).strip()
            cancelled = await run(daemon, "cancel", request_id)
            assert cancelled.returncode == 0, cancelled.stderr
            out, err = await asyncio.to_thread(waiting.communicate, timeout=60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
    assert waiting.returncode == 5, err
    found = SUMMARY.match(out.strip())
    assert found is not None and found.group(1) == "cancelled" and found.group(5) == "1", out


def read_all(fd: int, into: bytearray) -> None:
    """Everything written to a pseudo-terminal until its last writer closes it."""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every writer has gone
            return
        if not chunk:
            return
        into += chunk


async def test_submit_wait_on_a_terminal_draws_a_progress_bar(daemon: Any, tmp_path: Path) -> None:
    """With a terminal on stderr, `submit --wait` draws a bar that reaches 100% (and no plain progress lines)."""
    async with Origin(FILES) as origin:
        batch = write_csv(tmp_path, [f'1,Lamp,"{origin.url}/img/photo.jpg,{origin.url}/img/low.jpg"'])
        controller, terminal = os.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's 100 columns
        drawn = bytearray()
        reader = threading.Thread(target=read_all, args=(controller, drawn))
        try:
            process = subprocess.Popen([*imgpipe_command(), "--config", str(daemon.client_config), "submit",
                                        str(batch), "--wait", "--interval", "0.05"], env=clean_environment(),
                                       stdout=subprocess.PIPE, stderr=terminal, text=True)
            os.close(terminal)
            reader.start()
            out, _ = await asyncio.to_thread(process.communicate, timeout=60)
            await asyncio.to_thread(reader.join, 10)
        finally:
            os.close(controller)
    assert process.returncode == 0, drawn.decode(errors="replace")
    screen = drawn.decode("utf-8", "replace")
    assert "100%" in screen and "2/2" in screen and "\r" in screen, screen
    assert "images, 0 failed" not in screen  # no plain lines on a terminal
    assert SUMMARY.match(out.splitlines()[1])


async def test_status_shows_a_summary_and_a_table_and_json_on_request(daemon: Any, tmp_path: Path) -> None:
    """`imgpipe status ID` prints a readable summary and one row per image (its error below a failed one, control
    characters from the CSV shown as ?); `--json` prints the daemon's JSON."""
    async with Origin(FILES) as origin:
        batch = write_csv(tmp_path, [f"1,Lamp,{origin.url}/img/photo.jpg",
                                     f"2,\"Desk \x1b[31mred\",{origin.url}/code/404"])
        submitted = await run(daemon, "submit", str(batch), "--wait", "--interval", "0.05")
        request_id = submitted.stdout.split()[0]
        shown = await run(daemon, "status", request_id)
        as_json = await run(daemon, "status", request_id, "--json")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"request   {request_id} (upload batch.csv)"
    assert lines[1] == "status    completed_with_errors"
    assert lines[3] == "images    2: 1 compressed, 0 kept, 1 failed, 0 pending"
    header = next(i for i, line in enumerate(lines) if line.startswith("serial"))
    assert lines[header].split() == ["serial", "product", "input", "url", "status", "in", "out", "saved"]
    assert lines[header + 1].split()[:4] == ["1", "Lamp", f"{origin.url}/img/photo.jpg", "compressed"]
    assert lines[header + 2].split()[:5] == ["2", "Desk", "?[31mred", f"{origin.url}/code/404", "failed"]
    assert lines[header + 3].startswith("    error: download failed: HTTP 404")
    assert "\x1b" not in shown.stdout
    assert as_json.returncode == 0
    body = json.loads(as_json.stdout)
    assert (body["request_id"], body["status"]) == (request_id, "completed_with_errors")


async def test_export_writes_the_csv_to_a_file_or_stdout(daemon: Any, tmp_path: Path) -> None:
    """`imgpipe export ID -o FILE` writes what GET /export/ID answers, without -o to stdout; a request still running
    is refused with exit 1 and the daemon's JSON on stderr."""
    async with Origin(FILES) as origin:
        batch = write_csv(tmp_path, [f"1,Lamp,{origin.url}/img/photo.jpg"])
        request_id = (await run(daemon, "submit", str(batch), "--wait", "--interval", "0.05")).stdout.split()[0]
        target = tmp_path / "out" / "result.csv"
        target.parent.mkdir()
        to_file = await run(daemon, "export", request_id, "-o", str(target))
        to_stdout = await run(daemon, "export", request_id)
        every = await run(daemon, "export")
        running = write_csv(tmp_path, [f"1,Lamp,{origin.url}/stall"], "running.csv")
        running_id = (await run(daemon, "submit", str(running))).stdout.strip()
        too_early = await run(daemon, "export", running_id)
        await run(daemon, "cancel", running_id)
    with urllib.request.urlopen(f"{daemon.base_url}/export/{request_id}", timeout=10) as response:
        expected = response.read()
    assert (to_file.returncode, to_file.stdout) == (0, "")
    assert target.read_bytes() == expected
    assert to_stdout.returncode == 0 and to_stdout.stdout.encode() == expected.replace(b"\r\n", b"\n")
    assert every.returncode == 0 and request_id in every.stdout
    assert too_early.returncode == 1 and too_early.stdout == ""
    assert json.loads(too_early.stderr)["error"] == "not_finished"


async def test_ctrl_c_stops_waiting_but_not_the_request(daemon: Any, tmp_path: Path) -> None:
    """Ctrl-C during `submit --wait` exits 130 saying how to follow the request, which goes on running."""
    async with Origin(FILES) as origin:
        waiting = submit_waiting(daemon, write_csv(tmp_path, [f"1,Lamp,{origin.url}/stall"]))
        try:
            assert waiting.stdout is not None and waiting.stderr is not None
            request_id = (await asyncio.to_thread(waiting.stdout.readline)).strip()
            first_line = await asyncio.to_thread(waiting.stderr.readline)  # it is following the request now
            assert first_line.startswith(f"{request_id} ")
            waiting.send_signal(signal.SIGINT)
            _, err = await asyncio.to_thread(waiting.communicate, timeout=30)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        status = json.loads((await run(daemon, "status", request_id, "--json")).stdout)
        await run(daemon, "cancel", request_id)
    assert waiting.returncode == 130
    assert err.endswith(f"imgpipe: stopped waiting; request {request_id} goes on (imgpipe status {request_id})\n")
    assert status["status"] in ("queued", "processing")
