"""load: concurrent uploads while clients poll GET /status/<id> open-loop at a fixed total rate.

All uploads (--load-requests CSVs of --load-images photos each) start at once. Status polls run on a clock:
poll k is due k/rate seconds after the first upload and goes to the accepted request ids round-robin; it is
sent when due whether or not earlier polls have been answered. Polling stops once every request is seen
finished, or at --load-timeout. Reported: images/s from the first upload until the last request was seen
finished (to within one poll round), status latency percentiles (client side, send to last body byte),
peak RSS, CPU use over the run, and errors (any non-2xx or exception in an upload or a poll).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import ACTIVE, Daemon, cpu_mark, cpu_use, new_workdir, origin_process, upload

POLL_TIMEOUT = aiohttp.ClientTimeout(total=10)
UPLOAD_TIMEOUT = aiohttp.ClientTimeout(total=60)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-requests", type=int, default=20, help="concurrent uploads")
    parser.add_argument("--load-images", type=int, default=100, help="images per uploaded CSV")
    parser.add_argument("--load-size", type=int, default=2000, help="side of the load scenario's photos")
    parser.add_argument("--load-rate", type=float, default=100.0, help="status polls per second, all clients")
    parser.add_argument("--load-timeout", type=float, default=900.0, help="stop polling after this many seconds")
    parser.add_argument("--load-goal-ms", type=float, default=50.0, help="status p99 goal (reported, not asserted)")


@dataclass
class Tally:
    start: float
    ids: list[str] = field(default_factory=list)
    acks: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    finished: dict[str, float] = field(default_factory=dict)  # request id -> when a poll first saw it finished
    last: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> its newest status body


def percentile(values: list[float], p: float) -> float:
    """Nearest rank, in ms."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return round(1000 * ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 1)


async def submit(client: aiohttp.ClientSession, base: str, urls: list[str], tally: Tally) -> None:
    sent = time.perf_counter()
    try:
        accepted = await upload(client, base, urls)
    except Exception as exc:
        tally.errors.append(f"upload: {exc!r}")
        return
    tally.acks.append(time.perf_counter() - sent)
    tally.ids.append(str(accepted["request_id"]))


async def poll(client: aiohttp.ClientSession, base: str, request_id: str, due: float, tally: Tally) -> None:
    sent = time.perf_counter()
    tally.lags.append(sent - due)
    try:
        async with client.get(f"{base}/status/{request_id}", timeout=POLL_TIMEOUT) as r:
            body = await r.read()
        tally.latencies.append(time.perf_counter() - sent)
        if r.status != 200:
            tally.errors.append(f"poll {request_id}: HTTP {r.status} {body[:200]!r}")
            return
        status = json.loads(body)
    except Exception as exc:
        tally.errors.append(f"poll {request_id}: {exc!r}")
        return
    tally.last[request_id] = status
    if status["status"] not in ACTIVE:
        tally.finished.setdefault(request_id, time.perf_counter())


async def poll_clock(client: aiohttp.ClientSession, base: str, rate: float, deadline: float,
                     uploads: list[asyncio.Task[None]], tally: Tally) -> int:
    """Open loop: poll k is due at start + k/rate; returns how many polls were sent."""
    in_flight: set[asyncio.Task[None]] = set()
    k = sent = 0
    while time.perf_counter() < deadline:
        if all(u.done() for u in uploads) and len(tally.finished) == len(tally.ids):
            break
        due = tally.start + k / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        k += 1
        if tally.ids:  # before the first upload is accepted there is nothing to poll
            task = asyncio.create_task(poll(client, base, tally.ids[k % len(tally.ids)], due, tally))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
    await asyncio.gather(*in_flight)
    return sent


async def run_load(photos: list[bytes], args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """`scratch`: where the daemon's folders go; the caller removes it after every measurement (see bench.scratch)."""
    requests, per = args.load_requests, args.load_images
    files = {f"r{r}p{i}.jpg": photos[(r * per + i) % len(photos)] for r in range(requests) for i in range(per)}
    async with origin_process(files) as origin:
        async with Daemon(new_workdir(scratch, "load"), args.workers, args.quality) as daemon, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=UPLOAD_TIMEOUT) as client:
            mark = cpu_mark()
            tally = Tally(start=time.perf_counter())
            uploads = [asyncio.create_task(submit(
                client, daemon.base, [f"{origin}/img/r{r}p{i}.jpg" for i in range(per)], tally))
                for r in range(requests)]
            polls = await poll_clock(client, daemon.base, args.load_rate, tally.start + args.load_timeout,
                                     uploads, tally)
            await asyncio.gather(*uploads)
            cpu = cpu_use(mark, daemon.pid)
    unfinished = len(tally.ids) - len(tally.finished)
    if unfinished:
        tally.errors.append(f"{unfinished} request(s) still unfinished after {args.load_timeout} s")
    images = requests * per
    ended = max(tally.finished.values()) if tally.finished and not unfinished else time.perf_counter()
    elapsed = ended - tally.start
    p99 = percentile(tally.latencies, 99)
    progress = [s["progress"] for s in tally.last.values()]
    return {
        "requests": requests,
        "images_per_request": per,
        "images": images,
        "size": f"{args.load_size}x{args.load_size}",
        "workers": args.workers,
        "quality": args.quality,
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(images / elapsed, 2),
        "upload_ack_p50_ms": percentile(tally.acks, 50),
        "upload_ack_max_ms": percentile(tally.acks, 100),
        "poll_rate_per_s": args.load_rate,
        "status_polls": polls,
        "status_p50_ms": percentile(tally.latencies, 50),
        "status_p99_ms": p99,
        "status_max_ms": percentile(tally.latencies, 100),
        # How late the bench itself sent polls against its clock (its own loop competing for the CPU).
        "poll_send_lag_p99_ms": percentile(tally.lags, 99),
        "poll_send_lag_max_ms": percentile(tally.lags, 100),
        "p99_goal_ms": args.load_goal_ms,
        "p99_goal_met": p99 < args.load_goal_ms,
        **daemon.memory(),
        **cpu,
        "errors": len(tally.errors),
        "error_samples": tally.errors[:5],
        "final_status": dict(Counter(s["status"] for s in tally.last.values())),
        "images_done": sum(p["done"] for p in progress),
        "images_failed": sum(p["failed"] for p in progress),
    }
