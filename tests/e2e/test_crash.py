"""kill -9 the real daemon at four points of one 280-image scenario, restart it, and check every promise.

One module-scoped scenario (the expensive part) runs once on each backend (SQLite, PostgreSQL); each test below
checks one promise on what it recorded. Kill points, in order, each followed by a restart on the same paths:

1. mid-download: after an upload of 240 images, as soon as some (not all) `ImageDownloaded` are in the log;
2. mid-compress: after the restart, as soon as more images are compressed but not all of them;
3. mid-ingest: a 20 MB inbox CSV (40 rows; ten 50 kB filler columns make reading and parsing it take
   a while) is dropped, and the daemon is killed the moment the file leaves the inbox root; what this
   hits is recorded (in practice the file sits claimed in `inbox/.claimed/`, its request not yet in the log);
4. after completion: the listener answers 500 to the first delivery of every message, so a retry is
   pending; the daemon is killed once a request has `RequestCompleted` and a `retrying` attempt but no
   `delivered` one.

The last restart runs everything to completion; then the daemon is stopped with SIGTERM, `imgpipe replay`
rebuilds the views, and a final start serves `/status` from the rebuilt views.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from daemon.instance import is_postgresql
from daemon.testing import Listener, Origin, Received, eventually, jpeg_bytes, photo

T = TypeVar("T")
pytestmark = pytest.mark.slow  # the scenario takes about 20 s on each backend

UPLOAD_ROWS, URLS_PER_ROW = 80, 3  # 240 images in one upload
INBOX_ROWS = 40  # 40 more from the inbox: 280 images in all
INBOX_NAME = "crash-batch.csv"
FILLER_COLUMNS, FILLER_BYTES = 10, 50_000  # 20 MB of cells the parser must read (and then ignores)
IMAGE_SIDE = 2000  # about 0.85 MB per JPEG body and ~20 ms of codec time each
ORIGIN_DELAY = 0.02  # seconds before the origin answers each image request
SECRET = "whsec_" + base64.b64encode(b"imgpipe crash test secret 32 by").decode()
START_DEADLINE = 30.0
STOP_DEADLINE = 20.0
KILL_DEADLINE = 30.0
FINISH_DEADLINE = 60.0
TERMINAL_IMAGE = ("ImageCompressed", "ImageFailed")


# helpers -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Database:
    """The daemon's database, read from outside through `read` (the `read_db` fixture: SQLite or PostgreSQL)."""

    url: str
    read: Callable[..., list[tuple[Any, ...]]]

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.read(self.url, sql, *params)

    def event_counts(self) -> Counter[str]:
        return Counter(dict(self.rows("SELECT type, COUNT(*) FROM events GROUP BY type")))

    def all_events(self) -> list[tuple[int, str, int, str, dict[str, Any]]]:
        rows = self.rows("SELECT position, stream, version, type, data FROM events ORDER BY position")
        return [(p, s, v, t, json.loads(d)) for p, s, v, t, d in rows]

    def data_of(self, event_type: str, stream: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(stream, data) of the events of `event_type` (in `stream`), in log order."""
        where, params = ("type = ?", (event_type,)) if stream is None else ("type = ? AND stream = ?",
                                                                             (event_type, stream))
        return [(s, json.loads(d)) for s, d in self.rows(
            f"SELECT stream, data FROM events WHERE {where} ORDER BY position", *params)]

    def dump_views(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every view_status_* table, ordered by all of its columns."""
        if is_postgresql(self.url):
            tables_sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            columns_sql = ("SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = current_schema() "
                           "AND table_name = ?")
        else:
            tables_sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
            columns_sql = "SELECT COUNT(*) FROM pragma_table_info(?)"
        dump: dict[str, list[tuple[Any, ...]]] = {}
        for table in sorted(name for (name,) in self.rows(tables_sql) if name.startswith("view_status_")):
            columns = self.rows(columns_sql, table)[0][0]
            order = ", ".join(str(i) for i in range(1, columns + 1))
            dump[table] = self.rows(f'SELECT * FROM "{table}" ORDER BY {order}')
        return dump


Identity = tuple[int, str]  # (pid, start time in clock ticks): a pid alone may be reused


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) for every process, from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), fields[19])
    return table


def descendants(pid: int) -> set[Identity]:
    table = process_table()
    found: set[Identity] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent and (child, started) not in found:
                found.add((child, started))
                todo.append(child)
    return found


def still_running(processes: set[Identity]) -> set[Identity]:
    table = process_table()
    return {(pid, started) for pid, started in processes if table.get(pid, (0, ""))[1] == started}


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


class SlowOrigin(Origin):
    """The loopback origin, answering each image request after `delay` seconds."""

    def __init__(self, files: dict[str, bytes], delay: float) -> None:
        super().__init__(files)
        self.delay = delay

    async def _image(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        return await super()._image(request)


class RefuseFirstListener(Listener):
    """A webhook receiver that answers 500 to the first delivery of each webhook-id and 200 to later ones."""

    def __init__(self) -> None:
        super().__init__([200])
        self.answers: list[int] = []  # the status code given to received[i]

    async def _hook(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(headers, await request.read(), time.time()))
        seen = sum(1 for r in self.received if r.headers.get("webhook-id") == headers.get("webhook-id"))
        status = 500 if seen == 1 else 200
        self.answers.append(status)
        return web.json_response({"ok": status == 200}, status=status)


@dataclass
class Daemon:
    """`python -m daemon run` on fixed paths, started and stopped (or killed) again and again."""

    root: Path
    env: dict[str, str]
    session: aiohttp.ClientSession
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kill_codes: list[int] = field(default_factory=list)
    stop_codes: list[int] = field(default_factory=list)
    left_behind: set[Identity] = field(default_factory=set)  # descendants alive when the daemon was killed

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['IMGPIPE_SERVER_PORT']}"

    def folder(self, name: str) -> Path:
        return self.root / name

    def stderr(self) -> str:
        return (self.root / "daemon.stderr").read_text(encoding="utf-8", errors="replace")[-4000:]

    async def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        with open(self.root / "daemon.stdout", "ab") as out, open(self.root / "daemon.stderr", "ab") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=self.root / "run",
                                            env=self.env, stdout=out, stderr=err)
        self.starts += 1
        process = self.process

        async def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"the daemon exited with {process.returncode} before /healthz:\n{self.stderr()}")
            try:
                async with self.session.get(f"{self.base_url}/healthz",
                                            timeout=aiohttp.ClientTimeout(total=1)) as response:
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await eventually(healthy, f"/healthz after start #{self.starts}", START_DEADLINE, interval=0.05)

    async def kill(self) -> None:
        """SIGKILL, no warning; remember which of its descendants were running at that moment."""
        assert self.process is not None
        self.left_behind |= descendants(self.process.pid)
        self.process.kill()
        self.kill_codes.append(await asyncio.to_thread(self.process.wait, STOP_DEADLINE))

    async def stop(self) -> None:
        """SIGTERM, then wait for the exit code (SIGKILL and record -1 if it ignores SIGTERM)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.process.wait, STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
            code = -1
        self.stop_codes.append(code)

    async def status_text(self, request_id: str) -> tuple[int, str]:
        async with self.session.get(f"{self.base_url}/status/{request_id}") as response:
            return response.status, await response.text()


def csv_text(rows: list[list[str]], header: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    return buffer.getvalue()


# the scenario --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """Everything the scenario observed; the tests only read it."""

    root: Path
    events: list[tuple[int, str, int, str, dict[str, Any]]]
    upload_id: str
    inbox_bytes: bytes
    evidence: dict[str, dict[str, Any]]
    received: list[Received]
    answers: list[int]
    status_before: dict[str, tuple[int, str]]
    status_after: dict[str, tuple[int, str]]
    views_before: dict[str, list[tuple[Any, ...]]]
    views_after: dict[str, list[tuple[Any, ...]]]
    replay: subprocess.CompletedProcess[str]
    kill_codes: list[int]
    stop_codes: list[int]
    orphans: set[Identity]
    log_lines: list[str]

    def streams(self, event_type: str) -> Counter[str]:
        return Counter(s for _, s, _, t, _ in self.events if t == event_type)

    def of_type(self, event_type: str) -> list[tuple[int, str, int, str, dict[str, Any]]]:
        return [e for e in self.events if e[3] == event_type]


async def run_scenario(root: Path, db: Database) -> Outcome:
    for name in ("run", "staging"):
        (root / name).mkdir()
    bodies = [jpeg_bytes(photo(IMAGE_SIDE, IMAGE_SIDE, seed=seed)) for seed in range(4)]
    files = {f"u{n}-{i}.jpg": bodies[(n + i) % 4] for n in range(UPLOAD_ROWS) for i in range(URLS_PER_ROW)}
    files |= {f"b{n}.jpg": bodies[n % 4] for n in range(INBOX_ROWS)}
    total = UPLOAD_ROWS * URLS_PER_ROW
    evidence: dict[str, dict[str, Any]] = {}
    async with SlowOrigin(files, ORIGIN_DELAY) as origin, RefuseFirstListener() as listener, \
            aiohttp.ClientSession() as session:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")} | {
            "PYTHONUNBUFFERED": "1",
            "IMGPIPE_SERVER_PORT": str(free_port()),
            "IMGPIPE_PATHS_INBOX": str(root / "inbox"),
            "IMGPIPE_PATHS_OUTBOX": str(root / "outbox"),
            "IMGPIPE_PATHS_IMAGES": str(root / "images"),
            "IMGPIPE_PATHS_DATABASE": db.url,
            "IMGPIPE_PATHS_WORK": str(root / ".imgpipe-work"),  # where SQLite's would be; PostgreSQL's is elsewhere
            "IMGPIPE_INBOX_SETTLE_SECONDS": "0.2",
            "IMGPIPE_NETWORK_ALLOW_PRIVATE": "true",  # origin and listener live on 127.0.0.1
            "IMGPIPE_COMPRESS_WORKERS": "2",
            "IMGPIPE_DOWNLOAD_BACKOFF_BASE": "0.05",
            "IMGPIPE_DOWNLOAD_BACKOFF_MAX": "0.2",
            "IMGPIPE_WEBHOOKS_URLS": listener.url,
            "IMGPIPE_WEBHOOKS_RETRY_SCHEDULE": "1,1,1,1",
            "IMGPIPE_WEBHOOKS_SECRET": SECRET,
        }
        daemon = Daemon(root, env, session)

        async def counts() -> Counter[str]:
            return await asyncio.to_thread(db.event_counts)

        try:
            await daemon.start()
            upload = csv_text(
                [[str(n), f"Upload product {n}",
                  ",".join(f"{origin.url}/img/u{n}-{i}.jpg" for i in range(URLS_PER_ROW))] for n in range(UPLOAD_ROWS)],
                ["S. No.", "Product Name", "Input Image Urls"])
            async with session.post(f"{daemon.base_url}/upload", data=upload.encode(),
                                    headers={"Content-Type": "text/csv"}) as response:
                assert response.status == 202, await response.text()
                upload_id = (await response.json())["request_id"]

            # (1) mid-download ----------------------------------------------------------------------
            async def some_downloaded() -> bool:
                return (await counts())["ImageDownloaded"] >= 30

            await eventually(some_downloaded, "30 ImageDownloaded", KILL_DEADLINE, interval=0.01)
            await daemon.kill()
            seen = await counts()
            evidence["mid_download"] = {"downloaded": seen["ImageDownloaded"], "compressed": seen["ImageCompressed"],
                                        "images": total}

            # (2) mid-compress ----------------------------------------------------------------------
            await daemon.start()
            before = seen["ImageCompressed"]

            async def compressing() -> bool:
                now = await counts()
                return now["ImageCompressed"] >= before + 30 and now["ImageDownloaded"] > now["ImageCompressed"]

            await eventually(compressing, "30 more ImageCompressed", KILL_DEADLINE, interval=0.01)
            await daemon.kill()
            seen = await counts()
            evidence["mid_compress"] = {"downloaded": seen["ImageDownloaded"], "compressed": seen["ImageCompressed"],
                                        "compressed_before": before, "images": total}

            # (3) mid-ingest of an inbox file ---------------------------------------------------------
            await daemon.start()
            filler = "x" * FILLER_BYTES
            inbox_text = csv_text(
                [[f"B{n}", f"Inbox product {n}", f"{origin.url}/img/b{n}.jpg", *[filler] * FILLER_COLUMNS]
                 for n in range(INBOX_ROWS)],
                ["S. No.", "Product Name", "Input Image Urls", *[f"Note {i}" for i in range(FILLER_COLUMNS)]])
            inbox_bytes = inbox_text.encode()
            staged = root / "staging" / INBOX_NAME
            staged.write_bytes(inbox_bytes)
            inbox = daemon.folder("inbox")
            os.replace(staged, inbox / INBOX_NAME)  # appears in the inbox complete, in one step

            async def taken() -> bool:
                return not (inbox / INBOX_NAME).exists()

            # A fast poll: the file is claimed (renamed out of the root) once it has settled, then stays in
            # .claimed/ while the daemon reads and parses 20 MB (the parse alone takes ~0.1 s) and records it.
            await eventually(taken, f"{INBOX_NAME} to leave the inbox root", KILL_DEADLINE, interval=0.002)
            await daemon.kill()
            accepted = await asyncio.to_thread(db.data_of, "RequestAccepted")
            evidence["mid_ingest"] = {
                "claimed": sorted(p.name for p in (inbox / ".claimed").iterdir()),
                "archived": sorted(p.name for p in (inbox / "archive").iterdir()),
                "accepted": sum(1 for _, data in accepted if data["source_name"] == INBOX_NAME),
            }

            # (4) after completion, before the webhook is delivered ------------------------------------
            await daemon.start()

            def pending_retry() -> dict[str, Any] | None:
                for stream, _ in db.data_of("RequestCompleted"):
                    outcomes = [data["outcome"] for _, data in db.data_of("WebhookAttempted", stream)]
                    if "retrying" in outcomes and "delivered" not in outcomes:
                        return {"stream": stream, "outcomes": outcomes}
                return None

            async def retry_pending() -> dict[str, Any] | None:
                return await asyncio.to_thread(pending_retry)

            pending = await eventually(retry_pending, "a completed request with a pending webhook retry", KILL_DEADLINE,
                                  interval=0.02)
            await daemon.kill()
            at_kill = await asyncio.to_thread(db.rows, "SELECT type, data FROM events WHERE stream = ? "
                                              "AND type IN ('RequestCompleted', 'WebhookAttempted')", pending["stream"])
            evidence["after_completion"] = {
                "completed": sum(1 for t, _ in at_kill if t == "RequestCompleted"),
                "outcomes": [json.loads(d)["outcome"] for t, d in at_kill if t == "WebhookAttempted"],
            }

            # the last restart runs to completion ---------------------------------------------------------
            await daemon.start()

            def finished() -> list[str] | None:
                requests = [s for s, _ in db.data_of("RequestAccepted")]
                delivered = {s for s, data in db.data_of("WebhookAttempted") if data["outcome"] == "delivered"}
                return requests if len(requests) == 2 and delivered >= set(requests) else None

            async def all_finished() -> list[str] | None:
                return await asyncio.to_thread(finished)

            request_ids = await eventually(all_finished, "both requests delivered", FINISH_DEADLINE, interval=0.05)

            async def views_settled() -> dict[str, tuple[int, str]] | None:
                """The /status bodies once both say completed with every delivery delivered."""
                bodies = {rid: await daemon.status_text(rid) for rid in request_ids}
                for code, text in bodies.values():
                    body = json.loads(text)
                    if code != 200 or body["status"] != "completed" or not body["webhooks"] or any(
                            w["state"] != "delivered" for w in body["webhooks"]):
                        return None
                return bodies

            status_before = await eventually(views_settled, "/status to show completed and delivered", FINISH_DEADLINE,
                                        interval=0.05)
            await daemon.stop()
            views_before = await asyncio.to_thread(db.dump_views)
            replay = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "daemon", "replay"], cwd=root / "run", env=env,
                capture_output=True, text=True, timeout=60, check=False)
            views_after = await asyncio.to_thread(db.dump_views)
            await daemon.start()
            status_after = {rid: await daemon.status_text(rid) for rid in request_ids}
            await daemon.stop()
            events = await asyncio.to_thread(db.all_events)
            orphans = still_running(daemon.left_behind)
        finally:
            if daemon.process is not None and daemon.process.poll() is None:
                await daemon.kill()
            # Clean up whatever outlived a killed daemon (by pid, checked against its start time).
            for pid, _ in still_running(daemon.left_behind):
                os.kill(pid, signal.SIGKILL)
        return Outcome(
            root=root, events=events, upload_id=upload_id, inbox_bytes=inbox_bytes, evidence=evidence,
            received=list(listener.received), answers=list(listener.answers), status_before=status_before,
            status_after=status_after, views_before=views_before, views_after=views_after, replay=replay,
            kill_codes=daemon.kill_codes, stop_codes=daemon.stop_codes, orphans=orphans,
            log_lines=(root / "daemon.stdout").read_text(encoding="utf-8", errors="replace").splitlines(),
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql"])
async def outcome(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  databases: Callable[[str, Path], AbstractContextManager[str]],
                  read_db: Callable[..., list[tuple[Any, ...]]]) -> AsyncIterator[Outcome]:
    """The scenario, run once on each backend."""
    root = tmp_path_factory.mktemp(f"crash-{request.param}")
    with databases(request.param, root) as url:
        yield await run_scenario(root, Database(url, read_db))


# the promises --------------------------------------------------------------------------------------
def test_each_kill_landed_where_it_was_aimed(outcome: Outcome) -> None:
    """Each SIGKILL hit its point: mid-download, mid-compress, mid-ingest, and completed-but-not-delivered."""
    download, compress = outcome.evidence["mid_download"], outcome.evidence["mid_compress"]
    assert 0 < download["downloaded"] < download["images"], download
    assert download["compressed"] < download["images"], download
    assert compress["compressed_before"] < compress["compressed"] < compress["images"], compress
    assert compress["downloaded"] > compress["compressed"], compress  # bodies were waiting for the codec
    ingest = outcome.evidence["mid_ingest"]
    assert ingest["archived"] == [] and len(ingest["claimed"]) == 1, ingest
    assert ingest["claimed"][0].endswith(f"--{INBOX_NAME}"), ingest
    after = outcome.evidence["after_completion"]
    assert after["completed"] == 1, after
    assert "retrying" in after["outcomes"] and "delivered" not in after["outcomes"], after
    assert outcome.kill_codes == [-signal.SIGKILL] * 4


def test_every_request_completes_exactly_once(outcome: Outcome) -> None:
    """Both accepted requests have exactly one RequestCompleted (all images done) and /status says completed."""
    accepted = outcome.streams("RequestAccepted")
    assert len(accepted) == 2 and set(accepted.values()) == {1}
    assert outcome.upload_id in accepted
    assert outcome.streams("RequestCompleted") == accepted
    images = {s: len(d["products"]) for _, s, _, _, d in outcome.of_type("RequestAccepted")}
    assert images[outcome.upload_id] == UPLOAD_ROWS
    for _, stream, _, _, data in outcome.of_type("RequestCompleted"):
        expected = UPLOAD_ROWS * URLS_PER_ROW if stream == outcome.upload_id else INBOX_ROWS
        assert data == {"status": "completed", "images": expected, "done": expected, "failed": 0}
    for request_id in accepted:
        code, text = outcome.status_before[request_id]
        body = json.loads(text)
        assert code == 200 and body["status"] == "completed"
        assert body["progress"]["pending"] == 0 and body["progress"]["done"] == body["progress"]["images"]


def test_every_image_has_exactly_one_output_file(outcome: Outcome) -> None:
    """Each of the 280 requested images has one ImageCompressed and exactly one `stem.*` file, nothing else."""
    requested = [d["stem"] for *_, d in outcome.of_type("ImageRequested")]
    assert len(requested) == len(set(requested)) == UPLOAD_ROWS * URLS_PER_ROW + INBOX_ROWS
    compressed = Counter((s, d["product"], d["index"]) for _, s, _, _, d in outcome.of_type("ImageCompressed"))
    assert len(compressed) == len(requested) and set(compressed.values()) == {1}
    assert not outcome.of_type("ImageFailed")
    images = outcome.root / "images"
    outputs = [p.name for p in images.iterdir() if p.is_file() and not p.name.startswith(".")]
    per_stem = Counter(os.path.splitext(name)[0] for name in outputs)
    assert {stem: per_stem[stem] for stem in requested if per_stem[stem] != 1} == {}
    assert set(per_stem) == set(requested)  # no stray outputs either
    assert sorted(d["name"] for *_, d in outcome.of_type("ImageCompressed")) == sorted(outputs)


def test_no_temporary_files_are_left(outcome: Outcome) -> None:
    """No .tmp/.part file anywhere, no hidden file in images/ and nothing left in the working folder's bodies (but
    recycled files for the next downloads) or inbox/.claimed."""
    leftovers = [p for name in ("images", "outbox", "inbox", ".imgpipe-work") for p in (outcome.root / name).rglob("*")
                 if p.name.endswith((".tmp", ".part"))]
    assert leftovers == []
    hidden = [p.name for p in (outcome.root / "images").iterdir() if p.name.startswith(".")]
    assert hidden == []
    bodies = outcome.root / ".imgpipe-work" / "bodies"
    assert [p for p in files_under(bodies) if p.parent.name != ".recycled"] == []
    assert files_under(outcome.root / "inbox" / ".claimed") == []


def test_the_inbox_file_is_ingested_exactly_once(outcome: Outcome) -> None:
    """The dropped CSV is archived exactly once, byte for byte, under the id of its one RequestAccepted."""
    inbox = outcome.root / "inbox"
    archived = [p for p in (inbox / "archive").iterdir() if p.name.endswith(f"--{INBOX_NAME}")]
    assert len(archived) == 1
    assert archived[0].read_bytes() == outcome.inbox_bytes
    mine = [(s, d) for _, s, _, _, d in outcome.of_type("RequestAccepted") if d["source_name"] == INBOX_NAME]
    assert len(mine) == 1 and mine[0][1]["source"] == "inbox"
    assert archived[0].name == f"{mine[0][0]}--{INBOX_NAME}"
    assert [p.name for p in inbox.iterdir() if p.is_file()] == []
    assert files_under(inbox / "rejected") == []


def test_every_webhook_message_is_delivered_under_one_id(outcome: Outcome) -> None:
    """Each request's completion message reached the listener (a 200 among its answers), always under one webhook-id."""
    versions = {s: v for _, s, v, _, _ in outcome.of_type("RequestCompleted")}
    ids_by_request: dict[str, set[str]] = {}
    answered: dict[str, list[int]] = {}
    wh = Webhook(SECRET)
    for received, answer in zip(outcome.received, outcome.answers, strict=True):
        payload = wh.verify(received.body, received.headers)  # raises on a bad or missing signature
        request_id = payload["data"]["request_id"]
        ids_by_request.setdefault(request_id, set()).add(received.headers["webhook-id"])
        answered.setdefault(received.headers["webhook-id"], []).append(answer)
    assert ids_by_request == {s: {f"msg_{s}_{v}"} for s, v in versions.items()}
    assert all(200 in answers for answers in answered.values()), answered
    outcomes: dict[str, list[str]] = {}
    for _, stream, _, _, data in outcome.of_type("WebhookAttempted"):
        outcomes.setdefault(stream, []).append(data["outcome"])
    # The refused first attempt was recorded and retried; delivery is the last word on each message.
    assert {s: (o[0], o[-1]) for s, o in outcomes.items()} == {s: ("retrying", "delivered") for s in versions}


def test_the_outbox_has_one_csv_per_request(outcome: Outcome) -> None:
    """outbox/ holds exactly one result CSV per request, each listing one output URL per input URL."""
    inbox_id = next(s for s in outcome.streams("RequestAccepted") if s != outcome.upload_id)
    expected = {f"{outcome.upload_id}.csv": UPLOAD_ROWS, f"{inbox_id}--{INBOX_NAME}": INBOX_ROWS}
    written = {p.name: p for p in (outcome.root / "outbox").iterdir()}
    assert set(written) == set(expected)
    for name, rows in expected.items():
        table = list(csv.reader(io.StringIO(written[name].read_text(encoding="utf-8"))))
        assert table[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
        assert len(table) == rows + 1
        for row in table[1:]:
            inputs, outputs = row[2].split(","), row[3].split(",")
            assert len(outputs) == len(inputs) and all("/images/" in url for url in outputs), row


def test_replay_rebuilds_the_views_byte_for_byte(outcome: Outcome) -> None:
    """`imgpipe replay` on the stopped daemon reproduces every view_status_* row and every /status body."""
    assert outcome.replay.returncode == 0, outcome.replay.stderr
    assert json.loads(outcome.replay.stdout.splitlines()[-1])["event"] == "replayed"
    assert sorted(outcome.views_before) == ["view_status_attempts", "view_status_deliveries",
                                            "view_status_images", "view_status_notifications",
                                            "view_status_requests"]
    assert len(outcome.views_before["view_status_images"]) == UPLOAD_ROWS * URLS_PER_ROW + INBOX_ROWS
    assert len(outcome.views_before["view_status_requests"]) == 2 and outcome.views_before["view_status_attempts"]
    for table, rows in outcome.views_before.items():
        assert outcome.views_after[table] == rows, table
    assert outcome.status_after == outcome.status_before


def test_the_daemon_stops_cleanly_after_the_crashes(outcome: Outcome) -> None:
    """Both SIGTERM stops exit 0 and the daemon logged no unexpected error across all six runs."""
    assert outcome.stop_codes == [0, 0]
    errors = [line for line in outcome.log_lines if '"level": "error"' in line or '"level":"error"' in line]
    assert errors == []


def test_no_daemon_process_outlives_a_kill(outcome: Outcome) -> None:
    """Nothing the daemon started (compress workers, forkserver, resource tracker) survives its SIGKILL."""
    assert outcome.orphans == set()
