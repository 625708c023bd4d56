"""memory (optional, `--scenario memory`): peak RSS of one daemon over one large batch of heavy photos.

One daemon (SQLite, default settings, `--workers` codec workers) gets one upload of `--memory-images` URLs (default
2,000) that a loopback origin, in a process of its own, serves from the `--memory-photos` set's distinct photos
(default: grain, 2000x2000, about 1.5 MB each). When the completion webhook has arrived, each process reports
its kernel high-water mark (VmHWM): the daemon's main process, and every process of its pool (the forkserver,
the resource tracker and each codec worker) on its own. Goal: every one under 300 MB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import Daemon, descendants, new_workdir, origin_process, rss_kb, upload
from daemon.testing import Listener

GOAL_MB = 300


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-images", type=int, default=2000, help="memory: images in the one batch")
    parser.add_argument("--memory-photos", default="grain", help="memory: the image set served")


def role(pid: int, daemon: int) -> str:
    """What a process below the daemon is: its pool's forkserver and resource tracker are its own children, the
    codec workers the forkserver's."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    if parent != daemon:
        return "codec worker"
    return "resource tracker" if "resource_tracker" in command else "forkserver"


async def run_memory(photos: list[bytes], args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    files = {f"p{i}.jpg": photos[i % len(photos)] for i in range(args.memory_images)}
    async with origin_process(files) as origin:
        urls = [f"{origin}/img/{name}" for name in files]
        async with (Daemon(new_workdir(scratch, "memory"), args.workers, args.quality) as daemon,
                    aiohttp.ClientSession() as client, Listener([204]) as listener):
            started = time.perf_counter()
            accepted = await upload(client, daemon.base, urls, webhook_url=listener.url)
            await listener.wait_for(1, timeout=3600)
            elapsed = time.perf_counter() - started
            peaks = {pid: round(rss_kb(pid) / 1024, 1) for pid in descendants(daemon.pid)}
            pool = [{"pid": pid, "role": role(pid, daemon.pid), "peak_rss_mb": mb} for pid, mb in peaks.items()]
            main_mb = round(rss_kb(daemon.pid) / 1024, 1)
            async with client.get(f"{daemon.base}/status/{accepted['request_id']}",
                                  params={"products": "false"}) as r:
                status = await r.json()
    highest = max([main_mb, *peaks.values()])
    result = {"images": args.memory_images, "photos": args.memory_photos,
              "input_mb": round(sum(map(len, files.values())) / 1e6, 1), "status": status["status"],
              "elapsed_s": round(elapsed, 1), "daemon_peak_rss_mb": main_mb, "pool": pool,
              "highest_peak_rss_mb": highest, "goal_mb": GOAL_MB, "met": highest < GOAL_MB}
    print(f"memory: {args.memory_images} {args.memory_photos} photos in {elapsed:.1f} s ({status['status']}); peak RSS "
          f"daemon {main_mb} MB, " + ", ".join(f"{p['role']} {p['peak_rss_mb']} MB" for p in pool), file=sys.stderr)
    return result
