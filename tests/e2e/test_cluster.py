"""Three real daemons on one PostgreSQL database and one SeaweedFS bucket, each with its own folders: a batch
uploaded to one of them, another killed with kill -9 mid-batch; and the start-up refusals of a shared database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from daemon.s3server import BUCKET, SeaweedFS
from daemon.testing import (
    Listener,
    Origin,
    clean_environment,
    eventually,
    free_port,
    imgpipe_command,
    jpeg_bytes,
    photo,
)

pytestmark = pytest.mark.slow  # three daemons started, one killed and its leases run out: about 40 s

ROWS, URLS_PER_ROW = 16, 3  # 48 images
LEASE_SECONDS = 3.0
ORIGIN_DELAY = 0.1  # seconds before each image is answered: the batch is still running when a daemon is killed
START_DEADLINE = 45.0
BALANCER = "http://imgpipe.example"
FINISH_DEADLINE = 120.0


class SlowOrigin(Origin):
    async def _image(self, request: web.Request) -> web.Response:
        await asyncio.sleep(ORIGIN_DELAY)
        return await super()._image(request)


@dataclass
class Node:
    """One `imgpipe run` process and its own folders."""

    name: str
    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> list[dict[str, Any]]:
        text = (self.root / "stdout").read_text(encoding="utf-8")
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    def stderr(self) -> str:
        return (self.root / "stderr").read_text(encoding="utf-8", errors="replace")


def node_env(root: Path, name: str, port: int, database_url: str, storage: dict[str, str],
             listener_url: str) -> dict[str, str]:
    return {
        "IMGPIPE_SERVER_PORT": str(port),
        "IMGPIPE_SERVER_PUBLIC_URL": BALANCER,  # every daemon behind one load balancer
        "IMGPIPE_PATHS_DATABASE": database_url,
        **{f"IMGPIPE_PATHS_{folder.upper()}": str(root / folder) for folder in ("inbox", "outbox", "images", "work")},
        **{f"IMGPIPE_STORAGE_{key.upper()}": value for key, value in storage.items()},
        "IMGPIPE_CLUSTER_NODE": name,
        "IMGPIPE_CLUSTER_LEASE_SECONDS": str(LEASE_SECONDS),
        "IMGPIPE_COMPRESS_WORKERS": "1",
        "IMGPIPE_DOWNLOAD_CONCURRENCY": "4",
        "IMGPIPE_NETWORK_ALLOW_PRIVATE": "true",
        "IMGPIPE_WEBHOOKS_URLS": listener_url,
    }


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start(root: Path, name: str, env: dict[str, str]) -> Node:
    """(blocking) `imgpipe run` in `root`, once it answers /healthz."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
        process = subprocess.Popen([*imgpipe_command(), "run"], cwd=root, env=clean_environment(**env),
                                   stdout=out, stderr=err)
    node = Node(name, root, int(env["IMGPIPE_SERVER_PORT"]), process)
    deadline = time.monotonic() + START_DEADLINE
    while not healthy(node.url):
        if process.poll() is not None:
            pytest.fail(f"daemon {name} exited with {process.returncode} before answering:\n{node.stderr()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"daemon {name} did not answer within {START_DEADLINE:g} s:\n{node.stderr()}")
        time.sleep(0.05)
    return node


def stop(node: Node) -> None:
    if node.process.poll() is None:
        node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


@contextmanager
def cluster(tmp_path: Path, names: list[str], env: Callable[[Path, str, int], dict[str, str]]) -> Iterator[list[Node]]:
    """Daemons started one after the other (so the first is the leader), stopped with SIGTERM afterwards."""
    nodes: list[Node] = []
    try:
        for name in names:
            root = tmp_path / name
            nodes.append(start(root, name, env(root, name, free_port())))
        yield nodes
    finally:
        for node in nodes:
            stop(node)


def stored_objects(endpoint: str, prefix: str) -> list[str]:
    """The keys under `prefix/` in the bucket (ListObjectsV2)."""
    with urllib.request.urlopen(f"{endpoint}/{BUCKET}?list-type=2&prefix={prefix}/", timeout=10) as response:
        tree = ElementTree.fromstring(response.read())
    return sorted(element.text or "" for element in tree.iter() if element.tag.endswith("}Key"))


def csv_of(origin_url: str) -> bytes:
    lines = ["S. No.,Product Name,Input Image Urls"]
    for row in range(ROWS):
        urls = ",".join(f"{origin_url}/img/p{row}_{i}.jpg" for i in range(URLS_PER_ROW))
        lines.append(f'{row + 1},Product {row + 1},"{urls}"')
    return ("\n".join(lines) + "\n").encode()


def rows(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    from daemon.instance import connect_postgresql

    with connect_postgresql(database_url) as connection:
        return [tuple(row) for row in connection.execute(sql.replace("?", "%s"), params).fetchall()]


async def test_three_daemons_share_a_batch_and_a_killed_one_loses_nothing(
        tmp_path: Path, postgres_url: str, seaweed: SeaweedFS) -> None:
    """A batch uploaded to b, with a (the leader, also working on images) killed with kill -9 mid-batch: every
    image is compressed once and stored once, the request completes once with one webhook per listener, b and c
    answer the same status, and the outbox file is b's alone."""
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    storage = {"url": f"s3://{BUCKET}/{prefix}", "endpoint": seaweed.endpoint,
               "public_url": f"{seaweed.endpoint}/{BUCKET}/{prefix}"}
    files = {f"p{row}_{i}.jpg": jpeg_bytes(photo(480, 360, seed=row * 10 + i))
             for row in range(ROWS) for i in range(URLS_PER_ROW)}
    images = ROWS * URLS_PER_ROW
    async with SlowOrigin(files) as origin, Listener([200]) as listener, aiohttp.ClientSession() as http:
        def env(root: Path, name: str, port: int) -> dict[str, str]:
            return node_env(root, name, port, postgres_url, storage, listener.url)

        with cluster(tmp_path, ["a", "b", "c"], env) as nodes:
            a, b, c = nodes
            async def a_leads() -> bool:
                return any(e["event"] == "leadership_taken" for e in a.log())

            await eventually(a_leads, "a to lead", 30)
            form = aiohttp.FormData()
            form.add_field("file", csv_of(origin.url), filename="batch.csv", content_type="text/csv")
            async with http.post(f"{b.url}/upload", data=form) as response:
                assert response.status == 202, await response.text()
                request_id = (await response.json())["request_id"]

            def a_holds_claims() -> bool:
                held = rows(postgres_url, "SELECT COUNT(*) FROM claims WHERE owner = 'a' AND NOT settled")[0][0]
                done = rows(postgres_url, "SELECT COUNT(*) FROM events WHERE type = 'ImageCompressed'")[0][0]
                return bool(held > 0 and done < images - 10)

            await eventually(lambda: asyncio.to_thread(a_holds_claims), "a to hold claims mid-batch", 60)
            os.kill(a.process.pid, signal.SIGKILL)
            a.process.wait()
            orphaned = rows(postgres_url, "SELECT product, idx FROM claims WHERE owner = 'a' AND NOT settled")

            async def completed() -> bool:
                async with http.get(f"{b.url}/status/{request_id}") as answer:
                    return bool((await answer.json())["status"] == "completed")

            await eventually(completed, "the request to complete without a", FINISH_DEADLINE)
            await listener.wait_for(1)
            await eventually(lambda: asyncio.to_thread(
                rows, postgres_url, "SELECT 1 FROM events WHERE type = 'WebhookAttempted'"), "the delivery recorded", 30)

            statuses = []
            for node in (b, c):
                async with http.get(f"{node.url}/status/{request_id}") as answer:
                    statuses.append(await answer.json())
            assert statuses[0] == statuses[1]
            status = statuses[0]
            assert status["progress"]["done"] == images

            compressed = rows(postgres_url, "SELECT data FROM events WHERE type = 'ImageCompressed' AND stream = ?",
                              request_id)
            per_image = Counter((json.loads(d)["product"], json.loads(d)["index"]) for d, in compressed)
            assert len(per_image) == images and set(per_image.values()) == {1}
            assert rows(postgres_url, "SELECT COUNT(*) FROM events WHERE type = 'RequestCompleted'")[0][0] == 1
            # a's images passed to the others: re-offered once its leases ran out (or taken by one reading late).
            owners = dict(((p, i), (o, settled)) for p, i, o, settled in rows(
                postgres_url, "SELECT product, idx, owner, settled FROM claims"))
            assert orphaned and all(owners[image] in (("b", True), ("c", True)) for image in orphaned)
            requeued = rows(postgres_url, "SELECT data FROM events WHERE type = 'ImageRequeued'")
            assert all("(a) stopped" in json.loads(d)["reason"] for d, in requeued)

            names = sorted(json.loads(d)["name"] for d, in compressed)
            assert stored_objects(seaweed.endpoint, prefix) == [f"{prefix}/{name}" for name in names]

            completions = [r for r in listener.received if json.loads(r.body)["type"] == "request.completed"]
            assert len(completions) == 1

            assert [p.name for p in (b.root / "outbox").iterdir()] == [f"{request_id}.csv"]
            assert not list((c.root / "outbox").iterdir())
            assert any(e["event"] == "leadership_taken" for e in b.log() + c.log())


async def test_a_shared_database_refuses_a_daemon_without_the_store_and_replay(
        tmp_path: Path, postgres_url: str, seaweed: SeaweedFS) -> None:
    """While a daemon with the object store runs, a second one without it, one under the same node name, and
    `imgpipe replay` are each refused with a message saying why."""
    storage = {"url": f"s3://{BUCKET}/refusals", "endpoint": seaweed.endpoint}
    first_port = free_port()
    first = node_env(tmp_path / "a", "a", first_port, postgres_url, storage, "")
    del first["IMGPIPE_WEBHOOKS_URLS"]

    def refused(root: Path, env: dict[str, str], *args: str) -> str:
        root.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([*imgpipe_command(), *args], cwd=root, env=clean_environment(**env),
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1, result.stderr
        return result.stderr

    with cluster(tmp_path, ["a"], lambda root, name, port: first):
        local = {**first, "IMGPIPE_SERVER_PORT": str(free_port()), "IMGPIPE_CLUSTER_NODE": "b"}
        for key in ("URL", "ENDPOINT"):
            local.pop(f"IMGPIPE_STORAGE_{key}")
        assert "more than one daemon on a database needs the object store" in refused(tmp_path / "b", local, "run")
        same = {**first, "IMGPIPE_SERVER_PORT": str(free_port())}
        assert "another daemon runs under this node name" in refused(tmp_path / "c", same, "run")
        assert "stop every daemon on this database first" in refused(tmp_path / "d", first, "replay")


async def test_a_webhook_retry_pending_on_a_killed_leader_is_sent_by_the_next_with_the_same_webhook_id(
        tmp_path: Path, postgres_url: str, seaweed: SeaweedFS) -> None:
    """The listener refuses the first delivery; the leader is killed with the retry pending: the daemon that
    takes over delivers it, under the same webhook-id, and the request stays completed once."""
    prefix = f"failover-{uuid.uuid4().hex[:8]}"
    storage = {"url": f"s3://{BUCKET}/{prefix}", "endpoint": seaweed.endpoint,
               "public_url": f"{seaweed.endpoint}/{BUCKET}/{prefix}"}
    files = {f"p0_{i}.jpg": jpeg_bytes(photo(320, 240, seed=i)) for i in range(URLS_PER_ROW)}
    async with Origin(files) as origin, Listener([500, 200]) as listener, aiohttp.ClientSession() as http:
        def env(root: Path, name: str, port: int) -> dict[str, str]:
            return {**node_env(root, name, port, postgres_url, storage, listener.url),
                    "IMGPIPE_WEBHOOKS_RETRY_SCHEDULE": "3"}

        with cluster(tmp_path, ["a", "b"], env) as (a, b):
            async def a_leads() -> bool:
                return any(e["event"] == "leadership_taken" for e in a.log())

            await eventually(a_leads, "a to lead", 30)
            urls = ",".join(f"{origin.url}/img/{name}" for name in files)
            async with http.post(f"{b.url}/upload", data=f'S. No.,Product Name,Input Image Urls\n1,P,"{urls}"\n',
                                 headers={"Content-Type": "text/csv"}) as response:
                assert response.status == 202, await response.text()
            await listener.wait_for(1)

            def retry_pending() -> bool:
                return bool(rows(postgres_url, "SELECT 1 FROM events WHERE type = 'WebhookAttempted'"))

            await eventually(lambda: asyncio.to_thread(retry_pending), "the refused delivery recorded", 30)
            os.kill(a.process.pid, signal.SIGKILL)
            a.process.wait()
            received = await listener.wait_for(2)

            async def b_leads() -> bool:
                return any(e["event"] == "leadership_taken" for e in b.log())

            assert await b_leads()

            def outcomes() -> list[str]:
                return [json.loads(d)["outcome"] for d, in rows(
                    postgres_url, "SELECT data FROM events WHERE type = 'WebhookAttempted' ORDER BY position")]

            async def recorded() -> bool:
                return len(await asyncio.to_thread(outcomes)) == 2

            await eventually(recorded, "the second attempt recorded", 30)
    assert len(received) == 2
    assert received[0].headers["webhook-id"] == received[1].headers["webhook-id"]
    assert outcomes() == ["retrying", "delivered"]
    assert rows(postgres_url, "SELECT COUNT(*) FROM events WHERE type = 'RequestCompleted'")[0][0] == 1


class GatedOrigin(Origin):
    """Holds every image request until `gate` is set."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(files)
        self.gate = asyncio.Event()

    async def _image(self, request: web.Request) -> web.Response:
        await self.gate.wait()
        return await super()._image(request)


async def test_a_cancel_taken_by_one_daemon_drops_the_downloads_another_has_in_flight(
        tmp_path: Path, postgres_url: str, seaweed: SeaweedFS) -> None:
    """b holds images whose downloads hang; a cancel sent to a drops them on b at once: every claim is settled
    while the origin still answers nothing, and both daemons show the request cancelled."""
    prefix = f"cancel-{uuid.uuid4().hex[:8]}"
    storage = {"url": f"s3://{BUCKET}/{prefix}", "endpoint": seaweed.endpoint}
    files = {f"p0_{i}.jpg": jpeg_bytes(photo(64, 48, seed=i)) for i in range(12)}
    async with GatedOrigin(files) as origin, aiohttp.ClientSession() as http:
        def env(root: Path, name: str, port: int) -> dict[str, str]:
            settings = node_env(root, name, port, postgres_url, storage, "")
            del settings["IMGPIPE_WEBHOOKS_URLS"]
            return settings

        try:
            with cluster(tmp_path, ["a", "b"], env) as (a, b):
                urls = ",".join(f"{origin.url}/img/{name}" for name in files)
                async with http.post(f"{a.url}/upload", data=f'S. No.,Product Name,Input Image Urls\n1,P,"{urls}"\n',
                                     headers={"Content-Type": "text/csv"}) as response:
                    assert response.status == 202, await response.text()
                    request_id = (await response.json())["request_id"]

                def open_claims(owner: str = "%") -> int:
                    return int(rows(postgres_url, "SELECT COUNT(*) FROM claims WHERE owner LIKE ? AND NOT settled",
                                    owner)[0][0])

                async def b_downloads() -> bool:
                    return await asyncio.to_thread(open_claims, "b") > 0

                await eventually(b_downloads, "b to hold images", 30)
                async with http.post(f"{a.url}/cancel/{request_id}") as response:
                    assert response.status == 200, await response.text()

                async def all_settled() -> bool:
                    return await asyncio.to_thread(open_claims) == 0

                await eventually(all_settled, "every claim settled with the origin still holding", 15)
                assert not origin.gate.is_set()
                for node in (a, b):
                    async with http.get(f"{node.url}/status/{request_id}") as answer:
                        assert (await answer.json())["status"] == "cancelled"
        finally:
            origin.gate.set()
