"""Runs the C extensions (the JPEG fast path over valid and damaged JPEGs, the SSIM score over planes of several
shapes) for .ci/run to watch under valgrind.

Not a test module (pytest does not collect it): `valgrind ... python tests/stages/requantize_memcheck.py`. Exits 1
if the extension is missing or answers wrongly; valgrind's own exit code reports bad memory use or a leak."""

from __future__ import annotations

import io
import sys

from PIL import Image, ImageCms

from daemon.stages import _similarity, requantize  # nothing else of ours: other imports bring their own leaks at exit


def jpeg(width: int, height: int, grain: float, mode: str = "RGB", **options: object) -> bytes:
    """A gradient with noise, made with Pillow alone."""
    base = Image.merge("RGB", [Image.linear_gradient("L").rotate(angle).resize((width, height)) for angle in (0, 90, 45)])
    out = io.BytesIO()
    photo = Image.blend(base, Image.effect_noise((width, height), 40).convert("RGB"), grain)
    photo.convert(mode).save(out, "JPEG", **options)
    return out.getvalue()


def main() -> int:
    if not requantize.available():
        print("the extension is not built", file=sys.stderr)
        return 1
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photos = [
        jpeg(161, 97, 0.1, quality=90, icc_profile=icc),
        jpeg(96, 64, 0.3, quality=75, progressive=True),
        jpeg(80, 48, 0.3, "L", quality=90),
    ]
    for data in photos:
        for quality, optimize, progressive in ((50, False, False), (95, True, True), (5, False, True)):
            out, _ = requantize.requantize_scored(data, quality, optimize, progressive, 50_000_000, icc)
            if not out.startswith(b"\xff\xd8") or not out.endswith(b"\xff\xd9"):
                print("not a JPEG out", file=sys.stderr)
                return 1
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
        for reduce in (2, 4, 8):
            encoder = requantize.Requantizer(data, size, False, False, 50_000_000, None, reduce)
            after = encoder.after(encoder(50)).tobytes()
            before = encoder.before().tobytes()
            width, height = encoder.plane_size
            if width >= 11 and height >= 11 and not 0 < _similarity.ssim(before, after, width, height) <= 1:
                print("an SSIM out of range", file=sys.stderr)
                return 1
    for width, height in ((11, 11), (12, 40), (161, 97)):
        plane = bytes(range(256)) * (width * height // 256) + bytes(width * height % 256)
        if abs(_similarity.ssim(plane, plane, width, height) - 1) > 1e-6:
            print("a plane's SSIM with itself is not 1", file=sys.stderr)
            return 1
    try:
        _similarity.ssim(b"", b"", 10, 10)
        print("a plane smaller than a window was scored", file=sys.stderr)
        return 1
    except ValueError:
        pass
    data = photos[0]
    damaged = [data[: len(data) // 2], data[:300], data[:900] + bytes(b ^ 0x5A for b in data[900:]), b"\xff\xd8", b""]
    refused = 0
    for bad in damaged:
        try:
            requantize.Requantizer(bad, (161, 97), False, False, 50_000_000, None, 4)(50)
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
