"""The daemon as a real process: `imgpipe list`, and stopping with an event stream open."""

from __future__ import annotations

import http.client
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

CSV = b"S. No.,Product Name,Input Image Urls\n1,Shoe,http://127.0.0.1:9/a.jpg\n"


def upload(daemon: Any, name: str) -> str:
    request = urllib.request.Request(f"{daemon.base_url}/upload", data=CSV, method="POST",
                                     headers={"Content-Type": "text/csv",
                                              "Content-Disposition": f'attachment; filename="{name}"'})
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["request_id"])


def test_list_prints_the_newest_requests_a_page_at_a_time(launch_daemon: Callable[..., Any], tmp_path: Path,
                                                          database_url: str) -> None:
    """`imgpipe list --limit 1` prints the newest request and the command for the next page, which prints the other."""
    with launch_daemon(tmp_path, database_url) as daemon:
        older, newer = upload(daemon, "first.csv"), upload(daemon, "second.csv")
        config = ("--config", str(daemon.client_config))
        first = daemon.cli("list", "--limit", "1", *config)
        assert first.returncode == 0, first.stderr
        header, row, more = first.stdout.splitlines()
        assert header.split()[:3] == ["CREATED", "REQUEST", "STATUS"]
        assert newer in row and row.endswith("upload: second.csv") and "0/1" in row
        assert more.startswith("more: imgpipe list --before ")
        second = daemon.cli("list", "--limit", "1", "--before", more.rsplit(" ", 1)[1], *config)
        assert second.returncode == 0, second.stderr
        assert len(second.stdout.splitlines()) == 2 and older in second.stdout
        as_json = daemon.cli("list", "--json", "--status", "cancelled", *config)
        assert (as_json.returncode, json.loads(as_json.stdout)) == (0, {"requests": [], "next": None})
        refused = daemon.cli("list", "--limit", "500", *config)
        assert refused.returncode == 1
        assert json.loads(refused.stderr)["field"] == "limit"


def test_an_open_event_stream_does_not_hold_up_a_stop(launch_daemon: Callable[..., Any], tmp_path: Path,
                                                     database_url: str) -> None:
    """SIGTERM with a page's event stream still open stops the daemon (exit 0 within the harness's deadline; aiohttp
    alone would wait a minute for the stream), and the stream ends cleanly."""
    with launch_daemon(tmp_path, database_url) as daemon:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
        connection.request("GET", "/events")
        stream = connection.getresponse()
        assert stream.status == 200
        assert stream.readline() == b": connected\n"
    assert stream.read() == b"\n"  # the rest of the first message, then the end of the body
    connection.close()
