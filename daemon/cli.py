"""The `imgpipe` command: run | replay | status ID | list | submit FILE.csv | redeliver ID | retry ID | cancel ID | delete ID."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import structlog

from daemon import logs
from daemon.config import ConfigError, Settings, load_settings
from daemon.instance import DatabaseInUse, DatabaseUnreachable, exclusive
from daemon.listen import CannotListen, listening_sockets

log = structlog.get_logger("daemon")


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


def _http(settings: Settings, method: str, path: str, body: bytes | None = None,
          content_type: str = "text/csv", headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(f"{settings.public_url}{path}", data=body, method=method, headers=headers or {})
    if body is not None:
        request.add_header("Content-Type", content_type)
    for token in settings.server.tokens[:1]:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            code, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, answer = exc.code, exc.read()
    except OSError as exc:  # refused, unknown host, timed out, connection reset...
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"imgpipe: cannot reach the daemon at {settings.public_url}: {reason}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        return code, json.loads(answer or b"{}")
    except ValueError:  # e.g. a reverse proxy's HTML error page while the daemon is down
        text = answer[:200].decode("utf-8", "replace").strip()
        print(f"imgpipe: {settings.public_url} answered HTTP {code} that is not the daemon's JSON: {text}",
              file=sys.stderr)
        raise SystemExit(1) from None


def cmd_status(args: argparse.Namespace) -> int:
    code, body = _http(_settings(args), "GET", f"/status/{args.request_id}")
    print(json.dumps(body, indent=2, ensure_ascii=False))
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
                     str(r["bytes_in"]), str(r["bytes_out"]), f"{r['source']['kind']}: {r['source']['name']}"))
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
    # The file's name travels with it (RFC 6266), so the request's source is named after it.
    disposition = f"attachment; filename*=UTF-8''{urllib.parse.quote(os.fsencode(path.name))}"
    code, body = _http(_settings(args), "POST", "/upload", data, headers={"Content-Disposition": disposition})
    if code == 202:
        print(body["request_id"])
        return 0
    print(json.dumps(body, indent=2, ensure_ascii=False), file=sys.stderr)
    return 1


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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="imgpipe", description=__doc__)
    top.add_argument("--config", help="config file (default: ./config.toml)")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start the daemon in the foreground").set_defaults(func=cmd_run)
    sub.add_parser("replay", help="drop the views and rebuild them from the event log (refused while a daemon "
                   "uses the database)").set_defaults(func=cmd_replay)
    status = sub.add_parser("status", help="print a request's status from the running daemon")
    status.add_argument("request_id")
    status.set_defaults(func=cmd_status)
    listing = sub.add_parser("list", help="print the newest requests, a page at a time")
    listing.add_argument("--status", help="only requests in this status (completed, failed, processing...)")
    listing.add_argument("--limit", type=int, help="requests per page (default 20, at most 100)")
    listing.add_argument("--before", help="the cursor printed after the previous page")
    listing.add_argument("--json", action="store_true", help="print the JSON answer")
    listing.set_defaults(func=cmd_list)
    submit = sub.add_parser("submit", help="upload a CSV to the running daemon and print the request id")
    submit.add_argument("file")
    submit.set_defaults(func=cmd_submit)
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
