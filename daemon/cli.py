"""The `imgpipe` command: run | replay | status ID | list | submit FILE.csv [--wait] | export [ID] | redeliver ID |
retry ID | cancel ID | delete ID.

Exit status: 0 done (after `submit --wait`: the request completed); 1 the daemon refused, or could not be reached;
2 a bad configuration or command line; after `submit --wait`: 3 completed with errors, 4 failed, 5 cancelled;
130 interrupted (Ctrl-C) while waiting, the request going on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import structlog

from daemon import logs, terminal
from daemon.config import ConfigError, Settings, load_settings
from daemon.instance import DatabaseInUse, DatabaseUnreachable, exclusive
from daemon.listen import CannotListen, listening_sockets

log = structlog.get_logger("daemon")

# `submit --wait`: the exit status for each way a request can end (1 and 2 are taken, see above).
EXIT_BY_OUTCOME = {"completed": 0, "completed_with_errors": 3, "failed": 4, "cancelled": 5}
EXIT_INTERRUPTED = 130


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(Path(args.config) if args.config else None)
    except ConfigError as exc:
        print(f"imgpipe: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from daemon.app import build_app
    from daemon.eventlog.store import DatabaseAway

    settings = _settings(args)
    logs.configure()
    try:
        with exclusive(settings.database_url):
            sockets = listening_sockets(settings.server.host, settings.server.port)
            web.run_app(build_app(settings), sock=sockets, print=None, access_log=None, handle_signals=True)
    except (DatabaseInUse, DatabaseUnreachable, CannotListen) as exc:
        return _refused(exc)
    except DatabaseAway as exc:  # lost between taking the lock and opening the log: refused all the same
        return _refused(DatabaseUnreachable(settings.database_url, str(exc)))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from daemon.eventlog.store import DatabaseAway
    from daemon.replay import replay

    settings = _settings(args)
    logs.configure()
    try:
        with exclusive(settings.database_url):
            count = asyncio.run(replay(settings))
    except (DatabaseInUse, DatabaseUnreachable) as exc:
        return _refused(exc)
    except DatabaseAway as exc:
        return _refused(DatabaseUnreachable(settings.database_url, str(exc)))
    print(json.dumps({"event": "replayed", "events": count}))
    return 0


def _refused(exc: DatabaseInUse | DatabaseUnreachable | CannotListen) -> int:
    """Start-up refused: one error event in the log, the same in one line on stderr, exit status 1."""
    log.error(exc.event, message=str(exc), **exc.details)
    print(f"imgpipe: {exc}", file=sys.stderr)
    return 1


def _call(settings: Settings, method: str, path: str, body: bytes | None = None,
          content_type: str = "text/csv", headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """One request to the daemon: its status code, Content-Type and body; exit 1 if it cannot be reached."""
    request = urllib.request.Request(f"{settings.public_url}{path}", data=body, method=method, headers=headers or {})
    if body is not None:
        request.add_header("Content-Type", content_type)
    for token in settings.server.tokens[:1]:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), exc.read()
    except OSError as exc:  # refused, unknown host, timed out, connection reset...
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"imgpipe: cannot reach the daemon at {settings.public_url}: {reason}", file=sys.stderr)
        raise SystemExit(1) from None


def _json(settings: Settings, code: int, answer: bytes) -> dict[str, object]:
    try:
        return dict(json.loads(answer or b"{}"))
    except ValueError:  # e.g. a reverse proxy's HTML error page while the daemon is down
        text = answer[:200].decode("utf-8", "replace").strip()
        print(f"imgpipe: {settings.public_url} answered HTTP {code} that is not the daemon's JSON: {text}",
              file=sys.stderr)
        raise SystemExit(1) from None


def _http(settings: Settings, method: str, path: str, body: bytes | None = None,
          content_type: str = "text/csv", headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    code, _, answer = _call(settings, method, path, body, content_type, headers)
    return code, _json(settings, code, answer)


def cmd_status(args: argparse.Namespace) -> int:
    code, body = _http(_settings(args), "GET", f"/status/{urllib.parse.quote(args.request_id, safe='')}")
    if args.json or code != 200:
        print(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        print(terminal.status_report(body))
    return 0 if code == 200 else 1


def cmd_list(args: argparse.Namespace) -> int:
    """The newest requests (GET /requests) as a table, or its JSON; the command for the next page at the end."""
    query = {k: v for k, v in (("limit", args.limit), ("status", args.status), ("before", args.before)) if v}
    code, body = _http(_settings(args), "GET", f"/requests?{urllib.parse.urlencode(query)}")
    if code != 200 or args.json:
        print(json.dumps(body, indent=2, ensure_ascii=False), file=sys.stdout if code == 200 else sys.stderr)
        return 0 if code == 200 else 1
    rows = [("CREATED", "REQUEST", "STATUS", "DONE", "FAILED", "BYTES IN", "BYTES OUT", "SOURCE")]
    for r in body["requests"]:  # type: ignore[attr-defined]
        p = r["progress"]
        rows.append((r["created_at"][:19], r["request_id"], r["status"], f"{p['done']}/{p['images']}", str(p["failed"]),
                     str(r["compression"]["bytes_in"]), str(r["compression"]["bytes_out"]),
                     f"{r['source']['kind']}: {r['source']['name']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    if body["next"]:
        print(f"more: imgpipe list --before {body['next']}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"imgpipe: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    settings = _settings(args)
    # The file's name travels with it (RFC 6266), so the request's source is named after it.
    disposition = f"attachment; filename*=UTF-8''{urllib.parse.quote(os.fsencode(path.name))}"
    code, body = _http(settings, "POST", "/upload", data, headers={"Content-Disposition": disposition})
    if code != 202:
        print(json.dumps(body, indent=2, ensure_ascii=False), file=sys.stderr)
        return 1
    request_id = str(body["request_id"])
    print(request_id, flush=True)
    return _wait(settings, request_id, args.interval) if args.wait else 0


def _wait(settings: Settings, request_id: str, interval: float) -> int:
    """Progress on stderr until the request finishes, then its summary on stdout; the exit status says how it ended."""
    def poll(products: bool = False) -> dict[str, Any]:
        code, body = _http(settings, "GET", f"/status/{request_id}?products={'true' if products else 'false'}")
        if code != 200:  # deleted meanwhile, say
            print(json.dumps(body, indent=2, ensure_ascii=False), file=sys.stderr)
            raise SystemExit(1)
        return body

    try:
        last = terminal.follow(poll, interval, sys.stderr)
    except KeyboardInterrupt:
        print(f"imgpipe: stopped waiting; request {request_id} goes on (imgpipe status {request_id})",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(terminal.summary(poll(products=True)))
    return EXIT_BY_OUTCOME[str(last["status"])]


def cmd_export(args: argparse.Namespace) -> int:
    """The export CSV of one finished request (or of every one) to a file or stdout."""
    settings = _settings(args)
    path = "/export" + (f"/{urllib.parse.quote(args.request_id, safe='')}" if args.request_id else "")
    code, content_type, answer = _call(settings, "GET", path)
    if code != 200 or content_type != "text/csv":
        print(json.dumps(_json(settings, code, answer), indent=2, ensure_ascii=False), file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_bytes(answer)
    else:
        sys.stdout.buffer.write(answer)
        sys.stdout.flush()
    return 0


# Commands on one request: (HTTP method, path before the id, help).
REQUEST_COMMANDS = {
    "redeliver": ("POST", "/redeliver/", "send a completed request's webhook again (same webhook-id)"),
    "retry": ("POST", "/retry/", "try the failed images of a finished request again"),
    "cancel": ("POST", "/cancel/", "stop a running request; what is compressed stays"),
    "delete": ("DELETE", "/requests/", "remove a finished request: its images, outbox file and archived CSV"),
}


def cmd_request(args: argparse.Namespace) -> int:
    """One of REQUEST_COMMANDS: the daemon's JSON answer on stdout (stderr if refused), exit 0 if it was done."""
    method, path, _ = REQUEST_COMMANDS[args.command]
    body_bytes = b"" if method == "POST" else None
    code, body = _http(_settings(args), method, f"{path}{urllib.parse.quote(args.request_id, safe='')}", body_bytes,
                       "application/json")
    print(json.dumps(body, indent=2, ensure_ascii=False), file=sys.stdout if code < 300 else sys.stderr)
    return 0 if code < 300 else 1


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {value!r}")
    return seconds


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="imgpipe", description=__doc__)
    top.add_argument("--config", help="config file (default: ./config.toml)")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start the daemon in the foreground").set_defaults(func=cmd_run)
    sub.add_parser("replay", help="drop the views and rebuild them from the event log (refused while a daemon "
                   "uses the database)").set_defaults(func=cmd_replay)
    status = sub.add_parser("status", help="print a request's status from the running daemon: a summary and a "
                            "table of its images")
    status.add_argument("request_id")
    status.add_argument("--json", action="store_true", help="print the daemon's JSON answer instead")
    status.set_defaults(func=cmd_status)
    listing = sub.add_parser("list", help="print the newest requests, a page at a time")
    listing.add_argument("--status", help="only requests in this status (completed, failed, processing...)")
    listing.add_argument("--limit", type=int, help="requests per page (default 20, at most 100)")
    listing.add_argument("--before", help="the cursor printed after the previous page")
    listing.add_argument("--json", action="store_true", help="print the JSON answer")
    listing.set_defaults(func=cmd_list)
    submit = sub.add_parser("submit", help="upload a CSV to the running daemon and print the request id")
    submit.add_argument("file")
    submit.add_argument("--wait", action="store_true", help="show progress until the request finishes, then a "
                        "summary; exit 0 completed, 3 completed with errors, 4 failed, 5 cancelled")
    submit.add_argument("--interval", type=_seconds, default=0.5, help="seconds between two looks at its status "
                        "(default 0.5)")
    submit.set_defaults(func=cmd_submit)
    export = sub.add_parser("export", help="write the export CSV of a finished request (without ID: of every "
                            "finished request)")
    export.add_argument("request_id", nargs="?")
    export.add_argument("-o", "--output", help="file to write (default: stdout)")
    export.set_defaults(func=cmd_export)
    for name, (_, _, help_text) in REQUEST_COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("request_id")
        command.set_defaults(func=cmd_request)
    for p in sub.choices.values():
        p.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: ./config.toml)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
