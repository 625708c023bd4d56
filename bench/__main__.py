"""make bench: two scenarios against the real daemon, one after the other, in one run.

throughput: the daemon end to end vs. the bare Pillow ceiling, measured side by side.
1. Generate N photographic 2000x2000 JPEGs (quality 90) and serve them from a loopback origin.
2. Start `imgpipe run` as a subprocess, upload one CSV listing them with a webhook_url; the time ends
   when the completion webhook arrives.
3. Ceiling: a process pool of the same size decodes and re-encodes the same files at the same quality,
   no network, no events.
Ceiling and pipeline alternate for --rounds rounds (default 3, a fresh daemon each). Reports images/s for
both and their ratio over all rounds, the lowest and median round's ratio, and the daemon's peak RSS.
Before the first round the bench waits, up to --settle-max seconds, until creating a file costs what it does
with no recent deletions, and it deletes no daemon's files before the end (see harness.settled_filesystem).

load (bench/load.py): concurrent uploads while clients poll /status at a fixed rate; see there.

Prints the results and writes them to bench/results/latest.json as
{"filesystem": {...}, "throughput": {...}, "load": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from bench.harness import (
    Daemon,
    cpu_mark,
    cpu_seconds,
    cpu_use,
    file_create_ms,
    make_photos,
    new_workdir,
    scratch,
    settled_filesystem,
    upload,
)
from bench.load import add_load_arguments, run_load
from daemon.testing import Listener, Origin

ROOT = Path(__file__).resolve().parent.parent


def bare_pillow(data: bytes, quality: int) -> int:
    """The ceiling's unit of work: one decode, one encode, nothing else."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # without it, save() first copies the lazily opened image: a slower, false ceiling
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
    return out.tell()


def ceiling(files: list[bytes], workers: int, quality: int) -> float:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(bare_pillow, files[:workers], [quality] * workers))  # warm the workers up
        start = time.perf_counter()
        list(pool.map(bare_pillow, files, [quality] * len(files), chunksize=1))
        return time.perf_counter() - start


async def run_daemon(urls: list[str], workers: int, quality: int, workdir: Path) -> dict[str, Any]:
    async with (Daemon(workdir, workers, quality) as daemon, aiohttp.ClientSession() as client,
                Listener([204]) as listener):
        mark = cpu_mark()
        start = time.perf_counter()
        accepted = await upload(client, daemon.base, urls, webhook_url=listener.url)
        ack = time.perf_counter() - start
        # The end is the daemon's own announcement, the completion webhook: polling the daemon would cost
        # it CPU and add up to a poll interval to the time. Waiting here costs the daemon nothing.
        await listener.wait_for(1, timeout=3600)
        elapsed = time.perf_counter() - start
        cpu = cpu_use(mark, daemon.pid)
        main_cpu_s = cpu_seconds(daemon.pid) - mark.processes.get(daemon.pid, 0.0)
        async with client.get(f"{daemon.base}/status/{accepted['request_id']}") as r:
            status = await r.json()
    return {"elapsed_s": elapsed, "ack_s": ack, "status": status["status"], "progress": status["progress"],
            **daemon.memory(), "cpu": cpu, "main_cpu_s": main_cpu_s}


async def throughput(photos: list[bytes], args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """`args.rounds` rounds of ceiling then pipeline, alternated so that a machine that speeds up or slows down
    during the run moves both; the headline figures are over all rounds, the spread is in `rounds`."""
    files = {f"p{i}.jpg": photos[i % len(photos)] for i in range(args.images)}
    n = args.images
    rounds: list[dict[str, Any]] = []
    async with Origin(files) as origin:
        for k in range(args.rounds):
            ceiling_s = ceiling(list(files.values()), args.workers, args.quality)
            create_ms = file_create_ms(scratch)
            daemon = await run_daemon([f"{origin.url}/img/{name}" for name in files], args.workers,
                                      args.quality, new_workdir(scratch, f"throughput-{k}"))
            if daemon["status"] != "completed":
                raise SystemExit(f"throughput: the batch ended {daemon['status']}: {daemon['progress']}")
            rounds.append({
                "ceiling_images_per_s": round(n / ceiling_s, 2),
                "pipeline_images_per_s": round(n / daemon["elapsed_s"], 2),
                "ratio": round(ceiling_s / daemon["elapsed_s"], 3),
                "upload_ack_ms": round(daemon["ack_s"] * 1000, 1),
                "daemon_peak_rss_mb": daemon["daemon_peak_rss_mb"],
                "pool_rss_mb": daemon["pool_rss_mb"],
                "cpu_cores_while_running": daemon["cpu"],
                "daemon_main_cpu_ms_per_image": round(1000 * daemon["main_cpu_s"] / n, 3),
                "file_create_ms": create_ms,
                "ceiling_s": ceiling_s, "pipeline_s": daemon["elapsed_s"],
            })
    ceiling_total = sum(r.pop("ceiling_s") for r in rounds)
    pipeline_total = sum(r.pop("pipeline_s") for r in rounds)
    ratios = sorted(r["ratio"] for r in rounds)
    cpu = {key: round(statistics.mean(r["cpu_cores_while_running"][key] for r in rounds), 2)
           for key in rounds[0]["cpu_cores_while_running"]}
    return {
        "images": n,
        "size": f"{args.size}x{args.size}",
        "input_mb": round(sum(len(b) for b in files.values()) / 1e6, 1),
        "workers": args.workers,
        "quality": args.quality,
        "ceiling_images_per_s": round(n * len(rounds) / ceiling_total, 2),
        "pipeline_images_per_s": round(n * len(rounds) / pipeline_total, 2),
        "ratio": round(ceiling_total / pipeline_total, 3),
        "ratio_lowest": ratios[0],
        "ratio_median": statistics.median(ratios),
        "daemon_peak_rss_mb": max(r["daemon_peak_rss_mb"] for r in rounds),
        "pool_rss_mb": max(r["pool_rss_mb"] for r in rounds),
        "cpu_cores_while_running": cpu,
        "daemon_main_cpu_ms_per_image": round(statistics.mean(r["daemon_main_cpu_ms_per_image"] for r in rounds), 3),
        "rounds": rounds,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--scenario", choices=("all", "throughput", "load"), default="all")
    parser.add_argument("--images", type=int, default=int(os.environ.get("BENCH_IMAGES", 200)))
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=24, help="distinct generated photos, served round-robin")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quality", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="throughput: ceiling and pipeline, alternated")
    parser.add_argument("--settle-max", type=float, default=420.0,
                        help="seconds to wait at most for file creation to cost what it does with no recent deletions")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    add_load_arguments(parser)
    args = parser.parse_args()

    photos: dict[tuple[int, int], list[bytes]] = {}  # both scenarios share them when their sizes agree

    def photos_of(size: int, images: int) -> list[bytes]:
        key = (size, min(args.distinct, images))
        if key not in photos:
            photos[key] = make_photos(key[1], size, args.workers)
        return photos[key]

    results: dict[str, Any] = {}
    with scratch() as folder:
        results["filesystem"] = await settled_filesystem(folder, args.settle_max)
        print(json.dumps({"filesystem": results["filesystem"]}), flush=True)
        if args.scenario in ("all", "throughput"):
            results["throughput"] = await throughput(photos_of(args.size, args.images), args, folder)
            print(json.dumps({"throughput": results["throughput"]}, indent=2), flush=True)
        if args.scenario in ("all", "load"):
            load_photos = photos_of(args.load_size, args.load_requests * args.load_images)
            results["load"] = await run_load(load_photos, args, folder)
            print(json.dumps({"load": results["load"]}, indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if results.get("load", {}).get("errors"):
        raise SystemExit(f"load: {results['load']['errors']} error(s), e.g. {results['load']['error_samples']}")


if __name__ == "__main__":
    asyncio.run(main())
