"""scale: one daemon with all the codec workers against two daemons with half each, on the same machine, cores and
images, both sides on PostgreSQL (a schema of their own each round) and one SeaweedFS bucket (daemon.s3server).

Each round runs both sides in turn (the order swapping each round) on the same photos: an upload of `--images`
URLs with a webhook_url; the time ends when the completion webhook arrives. The two daemons share one database:
the upload goes to the first, and they split the images by claims (daemon.eventlog.claims).

Reported: images/s of each side over all rounds, the coordination efficiency (two-daemon throughput over one-daemon
throughput) as the median of the rounds' ratios, and the claim latency (from an image's append to its claim, as
the daemons log it when they stop: `claim_latency`) p50 and p99 over every claim of the two-daemon side, and of the
one-daemon side for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from bench.backends import Databases
from bench.harness import (
    DEFAULT_ROUNDS,
    Daemon,
    cpu_seconds,
    database_server_pids,
    descendants,
    new_workdir,
    upload,
)
from daemon.s3server import BUCKET, SeaweedFS
from daemon.testing import Listener, Origin

SIDES = ("one", "two")


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    # Longer than --images: however long the batch, its last claims leave one daemon up to a claim's worth of images
    # (8) behind the other, about 0.1 s of one idle worker, which on 200 images is 2% of the batch.
    parser.add_argument("--scale-images", type=int, default=1000,
                        help="scale: images per batch (0: --images)")
    parser.add_argument("--lease", type=float, default=15.0, help="scale: the daemons' cluster.lease_seconds")


def claim_latencies(log: Path) -> list[float]:
    """The claim latencies (ms) a daemon logged when it stopped."""
    samples: list[float] = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{") and '"claim_latency"' in line:
            samples += json.loads(line).get("samples_ms", [])
    return samples


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] if ordered else 0.0


async def run_side(side: str, urls: list[str], args: argparse.Namespace, scratch: Path, where: Databases,
                   store: SeaweedFS, round_: int) -> dict[str, Any]:
    """One batch on one daemon with every worker, or on two with half each; its time and the claim latencies."""
    workdir = new_workdir(scratch, f"scale-{side}-{round_}")
    database = where.url("postgresql", workdir)
    prefix = f"scale-{side}-{round_}-{uuid.uuid4().hex[:6]}"
    nodes = ["solo"] if side == "one" else ["a", "b"]
    workers = args.workers if side == "one" else max(1, args.workers // 2)
    daemons: list[Daemon] = []
    async with AsyncExitStack() as stack:
        for node in nodes:  # one after the other: the first leads
            folder = workdir / node
            folder.mkdir()
            env = {"IMGPIPE_STORAGE_URL": f"s3://{BUCKET}/{prefix}", "IMGPIPE_STORAGE_ENDPOINT": store.endpoint,
                   "IMGPIPE_CLUSTER_NODE": node, "IMGPIPE_CLUSTER_LEASE_SECONDS": str(args.lease),
                   "IMGPIPE_PATHS_WORK": str(folder / "work")}
            daemons.append(await stack.enter_async_context(Daemon(folder, workers, args.quality, database, env)))
        client = await stack.enter_async_context(aiohttp.ClientSession())
        listener = await stack.enter_async_context(Listener([204]))
        before = cpu_by_part(daemons)
        start = time.perf_counter()
        await upload(client, daemons[0].base, urls, webhook_url=listener.url)
        await listener.wait_for(1, timeout=3600)
        elapsed = time.perf_counter() - start
        after = cpu_by_part(daemons)
    per_daemon = [claim_latencies(daemon.workdir / "daemon.log") for daemon in daemons]
    return {"elapsed_s": elapsed, "claims": [ms for samples in per_daemon for ms in samples],
            "claims_by_daemon": [len(samples) for samples in per_daemon],
            "cpu_ms_per_image": {part: round(1000 * (after[part] - before[part]) / len(urls), 2) for part in after}}


def cpu_by_part(daemons: list[Daemon]) -> dict[str, float]:
    """CPU seconds so far of the daemons' main processes (summed), their pools, and the PostgreSQL server (all of
    it, whoever it serves): the split that shows where a second daemon's cost goes."""
    return {"daemon_main": sum(cpu_seconds(d.pid) for d in daemons),
            "pool": sum(cpu_seconds(p) for d in daemons for p in descendants(d.pid)),
            "database_server": sum(cpu_seconds(p) for p in database_server_pids())}


async def run_scale(photos: list[bytes], args: argparse.Namespace, scratch: Path, where: Databases) -> dict[str, Any]:
    n = args.scale_images or args.images
    files = {f"p{i}.jpg": photos[i % len(photos)] for i in range(n)}
    # SeaweedFS without an identity file takes any key; the daemons read theirs from these variables only.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "imgpipe-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "imgpipe-bench")
    store = SeaweedFS(scratch / "seaweedfs")
    await asyncio.to_thread(store.start)
    rounds: list[dict[str, Any]] = []
    claims: dict[str, list[float]] = {side: [] for side in SIDES}
    try:
        async with Origin(files) as origin:
            urls = [f"{origin.url}/img/{name}" for name in files]
            for k in range(args.rounds or DEFAULT_ROUNDS):
                round_: dict[str, Any] = {"order": list(SIDES if k % 2 == 0 else SIDES[::-1])}
                for side in round_["order"]:
                    result = await run_side(side, urls, args, scratch, where, store, k)
                    round_[side] = {"images_per_s": round(n / result["elapsed_s"], 2),
                                    "elapsed_s": round(result["elapsed_s"], 3),
                                    "claims_by_daemon": result["claims_by_daemon"],
                                    "cpu_ms_per_image": result["cpu_ms_per_image"]}
                    claims[side] += result["claims"]
                round_["efficiency"] = round(round_["one"]["elapsed_s"] / round_["two"]["elapsed_s"], 3)
                print(f"scale round {k + 1}: one daemon {round_['one']['images_per_s']} img/s, two daemons "
                      f"{round_['two']['images_per_s']} img/s, efficiency {round_['efficiency']}; CPU ms/image one "
                      f"{round_['one']['cpu_ms_per_image']}, two {round_['two']['cpu_ms_per_image']}, claims "
                      f"{round_['two']['claims_by_daemon']}", file=sys.stderr)
                rounds.append(round_)
    finally:
        store.stop()
    efficiencies = [r["efficiency"] for r in rounds]
    return {
        "images": n,
        "workers": args.workers,
        "one_daemon_images_per_s": round(n * len(rounds) / sum(r["one"]["elapsed_s"] for r in rounds), 2),
        "two_daemons_images_per_s": round(n * len(rounds) / sum(r["two"]["elapsed_s"] for r in rounds), 2),
        "efficiency_median": statistics.median(efficiencies),
        "efficiency_lowest": min(efficiencies),
        "efficiency_highest": max(efficiencies),
        "claim_latency_ms": {side: {"claims": len(claims[side]), "p50": percentile(claims[side], 0.5),
                                    "p99": percentile(claims[side], 0.99)} for side in SIDES},
        "rounds": rounds,
    }
