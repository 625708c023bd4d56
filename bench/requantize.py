"""The JPEG fast path against decode + encode, per image, in this process (one core): `python -m bench.requantize`.

For each of make bench's photo sets (smooth, grain; 2000x2000, quality 90) the ways to quality 50 alternate for
--rounds rounds over the same images; ms/image (CPU time of this process) is the median round's mean. The ways: the
codec's core alone (requantize, with its coefficient score, or Pillow's decode + encode) and the whole codec as the
daemon runs it (compress_file with default settings, the SSIM score included), on the fast path and forced onto
Pillow's. Also
reported: mean output bytes, mean SSIM against the decoded original at full resolution, and how a score from
reduced decodes of both files (libjpeg's 1/2, 1/4, 1/8 scaling, daemon.stages.requantize.reduced) and one from the
DCT coefficients while requantizing (requantize_scored) compare with it, and what the reduced decodes cost.
Prints JSON and writes it to bench/results/requantize.json.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from bench.harness import PHOTO_SETS, make_image
from daemon.stages import requantize
from daemon.stages.codec import EncodeSettings, compress_file
from daemon.testing import jpeg_bytes, ssim

ROOT = Path(__file__).resolve().parent.parent
SCALES = (2, 4, 8)


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im


def decode_encode(data: bytes, quality: int) -> bytes:
    """The Pillow path's unit of work, as the bench's ceiling does it."""
    return jpeg_bytes(decode(data), quality=quality)


def fast_path(data: bytes, quality: int) -> bytes:
    return requantize.requantize(data, quality, False, False, 50_000_000, None)


def fast_path_scored(data: bytes, quality: int) -> bytes:
    return requantize.requantize_scored(data, quality, False, False, 50_000_000, None)[0]


class Codec:
    """compress_file as a pool worker runs it, default settings, into one scratch folder (one name, overwritten)."""

    def __init__(self, folder: str, fast: bool) -> None:
        self.folder, self.fast = folder, fast
        self.bodies: dict[int, str] = {}  # by id() of the photo: each body written once, as the pool finds it on disk

    def __call__(self, data: bytes, quality: int) -> bytes:
        source = self.bodies.get(id(data))
        if source is None:
            source = self.bodies[id(data)] = os.path.join(self.folder, f"body{len(self.bodies)}")
            with open(source, "wb") as f:
                f.write(data)
        result = compress_file(source, self.folder, "out", EncodeSettings(quality=quality, jpeg_fast_path=self.fast))
        with open(os.path.join(self.folder, result.name), "rb") as f:
            return f.read()


def ms_per_image(method: Callable[[bytes, int], bytes], photos: list[bytes], quality: int) -> float:
    started = time.process_time()
    for data in photos:
        method(data, quality)
    return 1000 * (time.process_time() - started) / len(photos)


def timed_ms(work: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        work()
        times.append(time.process_time() - started)
    return 1000 * statistics.median(times)


def compare(photos: list[bytes], quality: int, rounds: int, folder: str) -> dict[str, Any]:
    methods: dict[str, Callable[[bytes, int], bytes]] = {"requantize": fast_path, "requantize_scored": fast_path_scored,
                                                         "decode_encode": decode_encode,
                                                         "codec_fast_path": Codec(folder, fast=True),
                                                         "codec_pillow_path": Codec(folder, fast=False)}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for k in range(rounds):
        for name in list(methods) if k % 2 == 0 else list(methods)[::-1]:
            samples[name].append(ms_per_image(methods[name], photos, quality))
    figures: dict[str, Any] = {"input_kb": round(statistics.mean(len(p) for p in photos) / 1000, 1)}
    figures |= {name: {"ms_per_image": round(statistics.median(times), 2)} for name, times in samples.items()}
    outputs = {name: [methods[name](data, quality) for data in photos] for name in ("requantize", "decode_encode")}
    for name, written in outputs.items():
        figures[name] |= {
            "kb": round(statistics.mean(len(o) for o in written) / 1000, 1),
            "ssim": round(statistics.mean(ssim(decode(d), decode(o)) for d, o in zip(photos, written)), 5),
            "ssim_reduced": {f"1/{s}": round(statistics.mean(
                ssim(requantize.reduced(d, s), requantize.reduced(o, s)) for d, o in zip(photos, written)), 5)
                for s in SCALES},
        }
    figures["requantize_scored"]["ssim_from_coefficients"] = round(statistics.mean(
        requantize.requantize_scored(d, quality, False, False, 50_000_000, None)[1] for d in photos), 5)
    figures["speed_up"] = round(figures["decode_encode"]["ms_per_image"] / figures["requantize"]["ms_per_image"], 2)
    figures["codec_speed_up"] = round(
        figures["codec_pillow_path"]["ms_per_image"] / figures["codec_fast_path"]["ms_per_image"], 2)
    figures["bytes_ratio"] = round(figures["requantize"]["kb"] / figures["decode_encode"]["kb"], 4)
    figures["ssim_difference"] = round(figures["requantize"]["ssim"] - figures["decode_encode"]["ssim"], 5)
    for name, data in (("output", outputs["requantize"][0]), ("original", photos[0])):
        figures[f"decode_{name}_ms"] = {"full (RGB)": round(timed_ms(functools.partial(decode, data)), 2)} | {
            f"1/{s} (luma)": round(timed_ms(functools.partial(requantize.reduced, data, s)), 2) for s in SCALES}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.requantize")
    parser.add_argument("--photos", type=int, default=3, help="distinct photos of each kind")
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--quality", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "requantize.json"))
    args = parser.parse_args()
    if not requantize.available():
        raise SystemExit("the JPEG fast path's extension is not built: nothing to compare")
    results: dict[str, Any] = {"size": f"{args.size}x{args.size}", "quality": args.quality, "rounds": args.rounds}
    for kind, grain in PHOTO_SETS.items():
        photos = [make_image(seed, args.size, grain) for seed in range(args.photos)]
        with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as folder:
            results[kind] = compare(photos, args.quality, args.rounds, folder)
        print(f"{kind}: requantize {results[kind]['requantize']['ms_per_image']} ms, decode + encode "
              f"{results[kind]['decode_encode']['ms_per_image']} ms; codec {results[kind]['codec_fast_path']}"
              f" vs {results[kind]['codec_pillow_path']}", file=sys.stderr)
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
