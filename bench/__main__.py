"""make bench: three scenarios, one after the other, in one run.

throughput: the daemon end to end vs. the bare Pillow ceiling, measured side by side, on each event-log backend.
1. Generate N photographic 2000x2000 JPEGs (quality 90) and serve them from a loopback origin.
2. Start `imgpipe run` as a subprocess, upload one CSV listing them with a webhook_url; the time ends
   when the completion webhook arrives. Once per backend (--backends, default SQLite and PostgreSQL, each
   daemon with a fresh log: a SQLite file, or a PostgreSQL schema of its own).
3. Ceiling: a process pool of the same size decodes and re-encodes the same files at the same quality,
   no network, no events.
Ceiling and pipelines alternate for --rounds rounds (default 8, or the next multiple of the variants run; a fresh
daemon each, their order rotating each round), on each image set of --photos
(smooth and fine-grain photographs, each its own rounds). Reports images/s for all and, per backend, the ceiling's
CPU time over the pipeline's (daemon main process and workers) and its wall time over the pipeline's, each as the
median and range of the rounds' ratios, CPU per image and per MB, the daemon's peak RSS, and PostgreSQL's images/s
over SQLite's as the median of the rounds' ratios. The ceiling scores each image as the daemon does by default.

Before the first round the bench waits, up to --settle-max seconds, until creating a file costs what it does
with no recent deletions, and it deletes no daemon's files before the end (see harness.settled_filesystem).

The score's cost (--compare-scoring, on by default): every round also runs the first backend's daemon with
compress.ssim off; `<backend>_vs_<backend>_unscored` is the median of the rounds' ratios of images/s.

target (bench/target.py): bytes saved with compress.target_ssim set to the plain quality's mean score, against
the plain quality, on the throughput scenario's distinct photos.
appends (bench/backends.py): appends per second through `EventLog.append` on each backend, in this process.
load (bench/load.py): concurrent uploads while clients poll /status at a fixed rate; see there.
scale (bench/scale.py): one daemon with every codec worker against two daemons with half each, sharing PostgreSQL
and a SeaweedFS bucket; coordination efficiency and claim latency; see there.
memory (bench/memory.py, only with --scenario memory): peak RSS of each process over 2,000 heavy photos.

Prints the results and writes them to bench/results/latest.json as
{"filesystem": {...}, "throughput": {...}, "target": {...}, "appends": {...}, "load": {...}, "scale": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from bench.backends import Databases, add_backend_arguments, backends_of, databases, run_appends
from bench.harness import (
    DEFAULT_ROUNDS,
    PHOTO_SETS,
    Daemon,
    cpu_mark,
    cpu_seconds,
    cpu_use,
    descendants,
    file_create_ms,
    make_photos,
    new_workdir,
    scratch,
    settled_filesystem,
    upload,
)
from bench.load import add_load_arguments, run_load
from bench.memory import add_memory_arguments, run_memory
from bench.scale import add_scale_arguments, run_scale
from bench.target import run_target
from daemon.stages.codec import EncodeSettings, decoded_output
from daemon.stages.similarity import Reference
from daemon.testing import Listener, Origin

ROOT = Path(__file__).resolve().parent.parent


def bare_pillow(data: bytes, quality: int, score_max_side: int | None) -> tuple[int, float]:
    """The ceiling's unit of work: one decode, one encode and, when the daemon scores by default, the same score
    (daemon.stages.similarity), nothing else. Its output's size and the CPU seconds it took."""
    started = time.process_time()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # without it, save() first copies the lazily opened image: a slower, false ceiling
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        if score_max_side is not None:
            reference = Reference(image, score_max_side)
            reference.score(decoded_output(out.getvalue(), reference))
    return out.tell(), time.process_time() - started


def ceiling(files: list[bytes], workers: int, quality: int, score_max_side: int | None) -> tuple[float, float]:
    """The ceiling's wall time and its workers' CPU seconds over `files`."""
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(bare_pillow, files[:workers], [quality] * workers, [score_max_side] * workers))  # warm up
        start = time.perf_counter()
        done = list(pool.map(bare_pillow, files, [quality] * len(files), [score_max_side] * len(files), chunksize=1))
        return time.perf_counter() - start, sum(cpu for _, cpu in done)


async def run_daemon(urls: list[str], workers: int, quality: int, workdir: Path, database: str,
                     settings: dict[str, str]) -> dict[str, Any]:
    async with (Daemon(workdir, workers, quality, database, settings) as daemon, aiohttp.ClientSession() as client,
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
        pool_cpu_s = sum(cpu_seconds(p) - mark.processes.get(p, 0.0) for p in descendants(daemon.pid))
        async with client.get(f"{daemon.base}/status/{accepted['request_id']}") as r:
            status = await r.json()
    return {"elapsed_s": elapsed, "ack_s": ack, "status": status["status"], "progress": status["progress"],
            **daemon.memory(), "cpu": cpu, "main_cpu_s": main_cpu_s, "pool_cpu_s": pool_cpu_s}


def spread(values: list[float]) -> dict[str, float]:
    """A figure over rounds: its median and range (single rounds swing on a shared machine)."""
    return {"median": round(statistics.median(values), 3), "lowest": min(values), "highest": max(values)}


def summary(rounds: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """One backend's figures over all rounds: images/s and the ceiling's total time over the pipeline's."""
    ceiling_total = sum(r["ceiling_s"] for r in rounds)
    pipeline_total = sum(r["pipeline_s"] for r in rounds)
    cpu = {key: round(statistics.mean(r["cpu_cores_while_running"][key] for r in rounds), 2)
           for key in rounds[0]["cpu_cores_while_running"]}
    return {
        "pipeline_images_per_s": round(n * len(rounds) / pipeline_total, 2),
        "ratio": round(ceiling_total / pipeline_total, 3),
        "daemon_peak_rss_mb": max(r["daemon_peak_rss_mb"] for r in rounds),
        "pool_rss_mb": max(r["pool_rss_mb"] for r in rounds),
        "cpu_cores_while_running": cpu,
        "daemon_main_cpu_ms_per_image": round(statistics.mean(r["daemon_main_cpu_ms_per_image"] for r in rounds), 3),
        # The ceiling's CPU over the pipeline's (main process and workers), per round: what the daemon's own work
        # costs, less disturbed by other users of the machine than wall time.
        "cpu_ratio": spread([r["cpu_ratio"] for r in rounds]),
        "wall_ratio": spread([r["ratio"] for r in rounds]),
        "cpu_ms_per_image": round(statistics.median(r["cpu_ms_per_image"] for r in rounds), 2),
        "cpu_ms_per_mb": round(statistics.median(r["cpu_ms_per_mb"] for r in rounds), 2),
        # What the codec workers spend per image: unlike images/s, other users of the machine barely move it.
        "pool_cpu_ms_per_image": round(statistics.mean(
            1000 * r["cpu_cores_while_running"]["pool_cpu_cores"] / r["pipeline_images_per_s"] for r in rounds), 2),
    }


def versus(rounds: list[dict[str, Any]], backend: str, baseline: str) -> dict[str, Any]:
    """`backend`'s images/s over `baseline`'s, per round (both ran on the same images in that round)."""
    ratios = [round(r[baseline]["pipeline_s"] / r[backend]["pipeline_s"], 3) for r in rounds]
    return {**spread(ratios), "rounds": ratios}



def rotated(variants: list[str], k: int) -> list[str]:
    """Round k's order: each variant takes each place in turn, so over a multiple of len(variants) rounds each runs
    first (right after the ceiling, which here costs it about 7% of images/s) as often as any other. Reversing
    every other round balanced only the first and the last."""
    shift = k % len(variants)
    return variants[shift:] + variants[:shift]


async def throughput(photos: list[bytes], args: argparse.Namespace, scratch: Path,
                     where: Databases, kind: str) -> dict[str, Any]:
    """Rounds of the ceiling then the pipeline on each backend and variant, alternated so that a machine that speeds
    up or slows down during the run moves all of them (and the variants' order rotates each round, so none always
    runs right after the ceiling). The headline figures are over all rounds, the spread is in `rounds`; the first
    backend's are also at the top level, where they were before there was more than one."""
    files = {f"p{i}.jpg": photos[i % len(photos)] for i in range(args.images)}
    n = args.images
    input_mb = sum(len(b) for b in files.values()) / 1e6
    # The ceiling scores as the daemon does by default, so the ratio is the daemon's own cost alone.
    defaults = EncodeSettings()
    score_max_side = defaults.ssim_max_side if defaults.ssim else None
    backends = backends_of(args)
    # Each backend's daemon runs the default settings; the first backend's also runs, in every round, with one
    # setting changed for each comparison asked for, so what that setting costs is measured side by side:
    # --compare-scoring, the score off; --compare-pillow-path, the codec as before the JPEG fast path.
    variants: dict[str, tuple[str, dict[str, str]]] = {b: (b, {}) for b in backends}
    changed = {f"{backends[0]}_unscored": (args.compare_scoring, {"IMGPIPE_COMPRESS_SSIM": "false"}),
               f"{backends[0]}_pillow_path": (args.compare_pillow_path, {"IMGPIPE_COMPRESS_JPEG_FAST_PATH": "false"})}
    variants |= {name: (backends[0], setting) for name, (asked, setting) in changed.items() if asked}
    rounds: list[dict[str, Any]] = []
    async with Origin(files) as origin:
        # A multiple of the variants: each then runs first after the ceiling (about 7% fewer images/s here) in as
        # many rounds as any other (`rotated`).
        count = args.rounds or -(-DEFAULT_ROUNDS // len(variants)) * len(variants)
        if count % len(variants):
            print(f"--rounds {count} is not a multiple of the {len(variants)} variants: some run first after the "
                  "ceiling once more than others", file=sys.stderr)
        for k in range(count):
            ceiling_s, ceiling_cpu_s = ceiling(list(files.values()), args.workers, args.quality, score_max_side)
            round_: dict[str, Any] = {"ceiling_images_per_s": round(n / ceiling_s, 2), "ceiling_s": ceiling_s,
                                      "ceiling_cpu_ms_per_image": round(1000 * ceiling_cpu_s / n, 2),
                                      "order": rotated(list(variants), k)}
            for variant in round_["order"]:
                backend, settings = variants[variant]
                create_ms = file_create_ms(scratch)
                workdir = new_workdir(scratch, f"throughput-{variant}-{k}")
                daemon = await run_daemon([f"{origin.url}/img/{name}" for name in files], args.workers,
                                          args.quality, workdir, where.url(backend, workdir), settings)
                if daemon["status"] != "completed":
                    raise SystemExit(f"throughput ({variant}): the batch ended {daemon['status']}: "
                                     f"{daemon['progress']}")
                round_[variant] = {
                    "pipeline_images_per_s": round(n / daemon["elapsed_s"], 2),
                    "ratio": round(ceiling_s / daemon["elapsed_s"], 3),
                    "upload_ack_ms": round(daemon["ack_s"] * 1000, 1),
                    "daemon_peak_rss_mb": daemon["daemon_peak_rss_mb"],
                    "pool_rss_mb": daemon["pool_rss_mb"],
                    "cpu_cores_while_running": daemon["cpu"],
                    "daemon_main_cpu_ms_per_image": round(1000 * daemon["main_cpu_s"] / n, 3),
                    "cpu_ratio": round(ceiling_cpu_s / (daemon["main_cpu_s"] + daemon["pool_cpu_s"]), 3),
                    "cpu_ms_per_image": round(1000 * (daemon["main_cpu_s"] + daemon["pool_cpu_s"]) / n, 2),
                    "cpu_ms_per_mb": round(1000 * (daemon["main_cpu_s"] + daemon["pool_cpu_s"]) / input_mb, 2),
                    "file_create_ms": create_ms,
                    "ceiling_s": ceiling_s, "pipeline_s": daemon["elapsed_s"],
                }
            print(f"throughput {kind} round {k + 1}: ceiling {round_['ceiling_images_per_s']} img/s, " + ", ".join(
                f"{v} {round_[v]['pipeline_images_per_s']} img/s (CPU ratio {round_[v]['cpu_ratio']})"
                for v in variants), file=sys.stderr)
            rounds.append(round_)
    by_backend = {variant: summary([r[variant] for r in rounds], n) for variant in variants}
    compared = {f"{b}_vs_{backends[0]}": versus(rounds, b, backends[0]) for b in backends[1:]}
    compared |= {f"{backends[0]}_vs_{name}": versus(rounds, backends[0], name) for name in changed if name in variants}
    for variant, figures in by_backend.items():
        print(f"throughput {kind} {variant} / ceiling: CPU median {figures['cpu_ratio']['median']} "
              f"({figures['cpu_ratio']['lowest']}-{figures['cpu_ratio']['highest']}), wall median "
              f"{figures['wall_ratio']['median']} ({figures['wall_ratio']['lowest']}-{figures['wall_ratio']['highest']})"
              f" over {len(rounds)} rounds", file=sys.stderr)
    for name, figures in compared.items():
        print(f"throughput {kind} {name.replace('_vs_', ' / ')}: median {figures['median']} over {len(rounds)} rounds "
              f"({figures['lowest']}-{figures['highest']})", file=sys.stderr)
    ceiling_total = sum(r["ceiling_s"] for r in rounds)
    for r in rounds:
        del r["ceiling_s"]
        for variant in variants:
            del r[variant]["ceiling_s"], r[variant]["pipeline_s"]
    return {
        "images": n,
        "size": f"{args.size}x{args.size}",
        "photos": kind,
        "input_mb": round(input_mb, 1),
        "ceiling_cpu_ms_per_image": round(statistics.median(r["ceiling_cpu_ms_per_image"] for r in rounds), 2),
        "workers": args.workers,
        "quality": args.quality,
        "ceiling_images_per_s": round(n * len(rounds) / ceiling_total, 2),
        "backend": backends[0],
        **by_backend[backends[0]],
        "by_backend": by_backend,
        **compared,
        "rounds": rounds,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--scenario", default="all",
                        choices=("all", "throughput", "target", "appends", "load", "scale", "memory"))
    parser.add_argument("--images", type=int, default=int(os.environ.get("BENCH_IMAGES", 200)))
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=24, help="distinct generated photos, served round-robin")
    parser.add_argument("--photos", default=",".join(PHOTO_SETS),
                        help=f"throughput: the image sets, each its own alternating rounds ({', '.join(PHOTO_SETS)})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quality", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=0,
                        help=f"throughput: rounds of the ceiling and every variant, their order rotating (default: "
                             f"{DEFAULT_ROUNDS}, or the next multiple of the variants); scale: rounds of one daemon and "
                             f"two, alternated (default {DEFAULT_ROUNDS})")
    parser.add_argument("--compare-scoring", action=argparse.BooleanOptionalAction, default=True,
                        help="throughput: also run the first backend with the SSIM score off in every round")
    parser.add_argument("--compare-pillow-path", action=argparse.BooleanOptionalAction, default=False,
                        help="throughput: also run the first backend with the JPEG fast path off in every round")
    parser.add_argument("--settle-max", type=float, default=420.0,
                        help="seconds to wait at most for file creation to cost what it does with no recent deletions")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    add_backend_arguments(parser)
    add_load_arguments(parser)
    add_scale_arguments(parser)
    add_memory_arguments(parser)
    args = parser.parse_args()

    photos: dict[tuple[int, int, str], list[bytes]] = {}  # the scenarios share them when their sizes agree

    def photos_of(size: int, images: int, kind: str = "smooth") -> list[bytes]:
        key = (size, min(args.distinct, images), kind)
        if key not in photos:
            photos[key] = make_photos(key[1], size, args.workers, kind)
        return photos[key]

    results: dict[str, Any] = {}
    with scratch() as folder, databases(args) as where:
        results["filesystem"] = await settled_filesystem(folder, args.settle_max)
        print(json.dumps({"filesystem": results["filesystem"]}), flush=True)
        if args.scenario in ("all", "throughput"):
            results["throughput"] = {}
            for kind in args.photos.split(","):
                results["throughput"][kind] = await throughput(photos_of(args.size, args.images, kind), args, folder,
                                                               where, kind)
                print(json.dumps({"throughput": {kind: results["throughput"][kind]}}, indent=2), flush=True)
        if args.scenario in ("all", "target"):
            results["target"] = run_target(photos_of(args.size, args.images), args, folder)
            print(json.dumps({"target": results["target"]}, indent=2), flush=True)
        if args.scenario in ("all", "appends"):
            results["appends"] = await run_appends(args, folder, where)
            print(json.dumps({"appends": results["appends"]}, indent=2), flush=True)
        if args.scenario in ("all", "load"):
            load_photos = photos_of(args.load_size, args.load_requests * args.load_images)
            results["load"] = await run_load(load_photos, args, folder)
            print(json.dumps({"load": results["load"]}, indent=2), flush=True)
        if args.scenario in ("all", "scale"):
            results["scale"] = await run_scale(photos_of(args.size, args.scale_images or args.images), args, folder,
                                               where)
            print(json.dumps({"scale": results["scale"]}, indent=2), flush=True)
        if args.scenario == "memory":
            results["memory"] = await run_memory(photos_of(args.size, args.memory_images, args.memory_photos), args,
                                                 folder)
            print(json.dumps({"memory": results["memory"]}, indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if results.get("load", {}).get("errors"):
        raise SystemExit(f"load: {results['load']['errors']} error(s), e.g. {results['load']['error_samples']}")


if __name__ == "__main__":
    asyncio.run(main())
