"""Runs the JPEG fast path's extension over valid and damaged JPEGs, for .ci/run to watch under valgrind.

Not a test module (pytest does not collect it): `valgrind ... python tests/stages/requantize_memcheck.py`. Exits 1
if the extension is missing or answers wrongly; valgrind's own exit code reports bad memory use or a leak."""

from __future__ import annotations

import sys

from PIL import ImageCms

from daemon.stages import requantize
from daemon.testing import fine_grain_photo, jpeg_bytes, smooth_photo


def main() -> int:
    if not requantize.built():
        print("the extension is not built", file=sys.stderr)
        return 1
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photos = [
        jpeg_bytes(smooth_photo(161, 97, seed=1), quality=90, icc_profile=icc),
        jpeg_bytes(fine_grain_photo(96, 64, seed=2), quality=75, progressive=True),
        jpeg_bytes(fine_grain_photo(80, 48, seed=3).convert("L"), quality=90),
    ]
    for data in photos:
        for quality, optimize, progressive in ((50, False, False), (95, True, True), (5, False, True)):
            out, _ = requantize.requantize_scored(data, quality, optimize, progressive, 50_000_000, icc)
            if not out.startswith(b"\xff\xd8") or not out.endswith(b"\xff\xd9"):
                print("not a JPEG out", file=sys.stderr)
                return 1
    data = photos[0]
    damaged = [data[: len(data) // 2], data[:300], data[:900] + bytes(b ^ 0x5A for b in data[900:]), b"\xff\xd8", b""]
    refused = 0
    for bad in damaged:
        try:
            requantize.requantize(bad, 50, False, False, 50_000_000, None)
        except requantize.RequantizeFailed:
            refused += 1
    try:
        requantize.requantize(data, 50, False, False, 100, None)  # a bomb, as far as a limit of 100 pixels goes
    except requantize.RequantizeFailed:
        refused += 1
    if refused != len(damaged) + 1:
        print(f"only {refused} of {len(damaged) + 1} bad inputs were refused", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
