"""The event log's backends as a bench dimension: where each daemon's log lives, and how fast each backend appends.

appends: in this process, through `EventLog.append` as the daemon's stages call it (a hop to the writer thread, one
transaction each): `--appends` appends of one small event, then appends of `--append-batch` events each, to one
stream of a fresh log. The backends alternate for `--append-rounds` rounds; each figure is the median round's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import cpu_seconds, database_server_pids, new_workdir
from daemon.eventlog.store import open_store
from daemon.events import ImageDownloaded
from daemon.instance import DatabaseUnreachable, connect_postgresql

BACKENDS = ("sqlite", "postgresql")
POSTGRES_URL = os.environ.get("IMGPIPE_BENCH_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated event-log backends; throughput alternates them on the same images")
    parser.add_argument("--postgres-url", default=POSTGRES_URL,
                        help="a PostgreSQL database the bench may create and drop schemas in")
    parser.add_argument("--appends", type=int, default=2000, help="appends: single-event appends per round")
    parser.add_argument("--append-batch", type=int, default=50, help="appends: events per batched append")
    parser.add_argument("--append-rounds", type=int, default=5, help="appends: rounds, the backends alternated")


def backends_of(args: argparse.Namespace) -> list[str]:
    names = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown or not names:
        raise SystemExit(f"--backends: {', '.join(unknown) or 'none given'}; known: {', '.join(BACKENDS)}")
    return names


class Databases:
    """Hands out each daemon's event-log URL: a SQLite file in its folder, or a PostgreSQL schema of its own (so a
    run never sees another's events, and each daemon gets the instance lock of its schema). Schemas are dropped when
    the bench ends."""

    def __init__(self, postgres_url: str) -> None:
        self.postgres_url = postgres_url
        self.schemas: list[str] = []

    def check(self, backends: list[str]) -> None:
        """Fail before measuring anything if PostgreSQL is wanted and cannot be reached."""
        if "postgresql" in backends:
            try:
                connect_postgresql(self.postgres_url).close()
            except DatabaseUnreachable as exc:
                raise SystemExit(f"{exc}; start PostgreSQL, pass --postgres-url (or IMGPIPE_BENCH_DATABASE_URL), "
                                 "or --backends sqlite") from None

    def url(self, backend: str, workdir: Path) -> str:
        if backend == "sqlite":
            return f"sqlite:///{workdir / 'imgpipe.db'}"
        schema = f"bench_{uuid.uuid4().hex[:16]}"
        with connect_postgresql(self.postgres_url) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        joiner = "&" if "?" in self.postgres_url else "?"
        return f"{self.postgres_url}{joiner}options=-csearch_path%3D{schema}"

    def drop(self) -> None:
        if not self.schemas:
            return
        with connect_postgresql(self.postgres_url) as admin:
            for schema in self.schemas:
                admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        self.schemas = []


@contextlib.contextmanager
def databases(args: argparse.Namespace) -> Iterator[Databases]:
    found = Databases(args.postgres_url)
    found.check(backends_of(args))
    try:
        yield found
    finally:
        found.drop()


def cpu_now() -> tuple[float, float]:
    """CPU seconds so far of this process (the loop and the store's threads) and of the PostgreSQL server."""
    return time.process_time(), sum(cpu_seconds(pid) for pid in database_server_pids())


async def append_round(url: str, appends: int, batch: int) -> dict[str, float]:
    """One fresh log: `appends` appends of one event, then appends of `batch` events (as many events in all). On
    two saturated cores an append's CPU, here and in the server, is what it takes from the codec workers, so it is
    reported beside the rate (the server's counts whatever else it served meanwhile)."""
    event = ImageDownloaded(product=0, index=0, stem=f"{uuid.uuid4().hex}_product-1_0", bytes=1_048_576, attempts=1)
    log = open_store(url)
    await log.open()
    try:
        await log.append("warm-up", [event])  # connects the writer thread: not an append's cost
        cpu, started = cpu_now(), time.perf_counter()
        for _ in range(appends):
            await log.append("single", [event])
        single_s, single_cpu = time.perf_counter() - started, cpu_now()
        batches = max(1, appends // batch)
        started = time.perf_counter()
        for _ in range(batches):
            await log.append("batched", [event] * batch)
        batch_s, batch_cpu = time.perf_counter() - started, cpu_now()
    finally:
        await log.close()
    return {"appends_per_s": appends / single_s, "append_ms": 1000 * single_s / appends,
            "append_cpu_ms": 1000 * (single_cpu[0] - cpu[0]) / appends,
            "append_server_cpu_ms": 1000 * (single_cpu[1] - cpu[1]) / appends,
            "batch_appends_per_s": batches / batch_s, "batch_events_per_s": batches * batch / batch_s,
            "batch_cpu_ms": 1000 * (batch_cpu[0] - single_cpu[0]) / batches,
            "batch_server_cpu_ms": 1000 * (batch_cpu[1] - single_cpu[1]) / batches}


async def run_appends(args: argparse.Namespace, scratch: Path, where: Databases) -> dict[str, Any]:
    backends = backends_of(args)
    rounds: list[dict[str, dict[str, float]]] = []
    for k in range(args.append_rounds):
        order = backends if k % 2 == 0 else backends[::-1]  # neither backend always goes first
        rounds.append({})
        for backend in order:
            url = where.url(backend, new_workdir(scratch, f"appends-{backend}-{k}"))
            rounds[-1][backend] = await append_round(url, args.appends, args.append_batch)
        print(f"appends round {k + 1}: " + ", ".join(
            f"{b} {r['appends_per_s']:.0f}/s, batched {r['batch_events_per_s']:.0f} events/s"
            for b, r in rounds[-1].items()), file=sys.stderr)
    by_backend = {
        backend: {key: round(statistics.median(r[backend][key] for r in rounds), 3 if key.endswith("_ms") else 1)
                  for key in rounds[0][backend]}
        for backend in backends}
    return {"appends": args.appends, "batch": args.append_batch, "rounds": args.append_rounds,
            "event": "ImageDownloaded", "by_backend": by_backend,
            "all_rounds": [{b: {key: round(v, 3) for key, v in r[b].items()} for b in backends} for r in rounds]}
