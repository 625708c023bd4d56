"""make bench: the daemon end to end vs. the bare Pillow ceiling, measured side by side in one run.

1. Generate N photographic 2000x2000 JPEGs (quality 90) and serve them from a loopback origin.
2. Start `imgpipe run` as a subprocess, upload one CSV listing them, poll /status until completed.
3. Ceiling: a process pool of the same size decodes and re-encodes the same files at the same quality,
   no network, no events.
Prints images/s for both, their ratio and the daemon's peak RSS; writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from daemon.testing import Origin, jpeg_bytes, photo

ROOT = Path(__file__).resolve().parent.parent


def make_image(seed: int, size: int) -> bytes:
    return jpeg_bytes(photo(size, size, seed=seed), quality=90)


def bare_pillow(data: bytes, quality: int) -> int:
    """The ceiling's unit of work: one decode, one encode, nothing else."""
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
    return out.tell()


def ceiling(files: list[bytes], workers: int, quality: int) -> float:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(bare_pillow, files[:workers], [quality] * workers))  # warm the workers up
        start = time.perf_counter()
        list(pool.map(bare_pillow, files, [quality] * len(files), chunksize=1))
        return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int, field: str = "VmHWM") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


async def run_daemon(urls: list[str], workers: int, quality: int, workdir: Path) -> dict[str, Any]:
    port = free_port()
    env = {
        **os.environ,
        "IMGPIPE_SERVER_PORT": str(port),
        "IMGPIPE_PATHS_INBOX": str(workdir / "inbox"),
        "IMGPIPE_PATHS_OUTBOX": str(workdir / "outbox"),
        "IMGPIPE_PATHS_IMAGES": str(workdir / "images"),
        "IMGPIPE_PATHS_DATABASE": f"sqlite:///{workdir / 'imgpipe.db'}",
        "IMGPIPE_COMPRESS_WORKERS": str(workers),
        "IMGPIPE_COMPRESS_QUALITY": str(quality),
        "IMGPIPE_NETWORK_ALLOW_PRIVATE": "true",
    }
    log = open(workdir / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    peak_main = peak_children = 0
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(300):
                try:
                    async with client.get(f"{base}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            body = "S. No.,Product Name,Input Image Urls\n" + "".join(
                f"{i},Product {i},{url}\n" for i, url in enumerate(urls, start=1))
            start = time.perf_counter()
            async with client.post(f"{base}/upload", data=body.encode(), headers={"Content-Type": "text/csv"}) as r:
                accepted = await r.json()
                assert r.status == 202, accepted
            ack = time.perf_counter() - start
            while True:
                async with client.get(accepted["status_url"].replace(accepted["status_url"].split("/status")[0], base)) as r:
                    status = await r.json()
                peak_main = max(peak_main, rss_kb(proc.pid))
                peak_children = max(peak_children, sum(rss_kb(c, "VmRSS") for c in children(proc.pid)))
                if status["status"] not in ("queued", "processing"):
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - start
        peak_main = max(peak_main, rss_kb(proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    images = status["progress"]
    return {"elapsed_s": elapsed, "ack_s": ack, "status": status["status"], "progress": images,
            "peak_rss_mb": round(peak_main / 1024, 1), "pool_rss_mb": round(peak_children / 1024, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--images", type=int, default=int(os.environ.get("BENCH_IMAGES", 200)))
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=24, help="distinct generated photos, served round-robin")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quality", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        distinct = list(pool.map(make_image, range(min(args.distinct, args.images)),
                                 [args.size] * min(args.distinct, args.images)))
    files = {f"p{i}.jpg": distinct[i % len(distinct)] for i in range(args.images)}
    print(f"generated {len(distinct)} distinct {args.size}x{args.size} photos in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)

    ceiling_s = ceiling(list(files.values()), args.workers, args.quality)
    async with Origin(files) as origin:
        with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
            daemon = await run_daemon([f"{origin.url}/img/{name}" for name in files], args.workers, args.quality,
                                      Path(tmp))
    n = args.images
    result = {
        "images": n,
        "size": f"{args.size}x{args.size}",
        "input_mb": round(sum(len(b) for b in files.values()) / 1e6, 1),
        "workers": args.workers,
        "quality": args.quality,
        "ceiling_images_per_s": round(n / ceiling_s, 2),
        "pipeline_images_per_s": round(n / daemon["elapsed_s"], 2),
        "ratio": round(ceiling_s / daemon["elapsed_s"], 3),
        "upload_ack_ms": round(daemon["ack_s"] * 1000, 1),
        "daemon_peak_rss_mb": daemon["peak_rss_mb"],
        "pool_rss_mb": daemon["pool_rss_mb"],
        "final_status": daemon["status"],
        "progress": daemon["progress"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
