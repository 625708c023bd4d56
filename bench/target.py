"""make bench's target scenario: compress.target_ssim against plain quality, on the throughput scenario's photos.

For each way of scoring (the default, a luma of at most 256 pixels a side, and full resolution): every distinct
photo is compressed at plain quality (--quality, 50), then again with target_ssim set to the mean score that
quality reached, through the codec the daemon's workers run (compress_file), in a pool of --workers. Reports the
bytes each way saved, the scores, and the qualities the target chose.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

from bench.harness import new_workdir
from daemon.config import CompressSettings
from daemon.events import Compressed
from daemon.stages.codec import EncodeSettings, compress_file
from daemon.stages.compress import encode_settings

SCORINGS = {"default": CompressSettings().ssim_max_side, "full_resolution": 0}


def compress_one(source: Path, images: Path, settings: EncodeSettings) -> Compressed:
    return compress_file(str(source), str(images), source.stem, settings)


def totals(results: list[Compressed]) -> dict[str, Any]:
    scores = [r.ssim for r in results if r.ssim is not None]
    bytes_in, bytes_out = sum(r.bytes_in for r in results), sum(r.bytes_out for r in results)
    return {"bytes_in": bytes_in, "bytes_out": bytes_out, "bytes_saved": bytes_in - bytes_out,
            "ssim_mean": round(statistics.mean(scores), 5), "ssim_lowest": min(scores),
            "qualities": dict(sorted(Counter(r.quality for r in results if r.quality is not None).items()))}


def run_target(photos: list[bytes], args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    folder = new_workdir(scratch, "target")
    sources = []
    for i, data in enumerate(photos):
        sources.append(folder / f"p{i}.jpg")
        sources[-1].write_bytes(data)
    figures: dict[str, Any] = {"photos": len(photos), "quality": args.quality}
    with ProcessPoolExecutor(args.workers) as pool:
        for scoring, max_side in SCORINGS.items():
            plain = dataclasses.replace(CompressSettings(), quality=args.quality, ssim_max_side=max_side)

            def run(settings: CompressSettings, label: str) -> dict[str, Any]:
                images = folder / f"{scoring}-{label}"
                images.mkdir()
                return totals(list(pool.map(compress_one, sources, repeat(images), repeat(encode_settings(settings)))))

            at_quality = run(plain, "quality")
            target = at_quality["ssim_mean"]
            at_target = run(dataclasses.replace(plain, target_ssim=target), "target")
            figures[scoring] = {
                "ssim_max_side": max_side, "target_ssim": target, "at_quality": at_quality, "at_target": at_target,
                "bytes_out_target_over_quality": round(at_target["bytes_out"] / at_quality["bytes_out"], 3),
            }
            print(f"target ({scoring}): quality {args.quality} scores {target} on average and writes "
                  f"{at_quality['bytes_out'] / 1e6:.1f} MB; target_ssim {target} writes "
                  f"{at_target['bytes_out'] / 1e6:.1f} MB (lowest score {at_target['ssim_lowest']})", file=sys.stderr)
    return figures
