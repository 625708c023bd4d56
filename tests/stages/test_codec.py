"""The compress stage's codec on real images generated with Pillow."""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import struct
import warnings
from array import array
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageCms, ImageFile, ImageStat

from daemon.stages.codec import (
    BodyGone,
    Compressed,
    EncodeSettings,
    ImageRejected,
    compress_file,
)
from daemon.testing import bomb_png

DEFAULTS = EncodeSettings()
PILLOW_PATH = EncodeSettings(jpeg_fast_path=False)
RED, BLUE = (220, 30, 30), (30, 30, 220)


def photo(size: tuple[int, int] = (600, 400), seed: int = 1) -> Image.Image:
    """A 'photographic' RGB image: smooth gradients plus seeded noise."""
    rng = random.Random(seed)
    noise = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    base = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize(size),
            Image.linear_gradient("L").rotate(90).resize(size),
            Image.radial_gradient("L").resize(size),
        ),
    )
    return Image.blend(base, noise, 0.15)


def save(im: Image.Image, path: Path, fmt: str, **params: object) -> str:
    im.save(path, fmt, **params)
    return str(path)


def photo_jpeg(tmp_path: Path, name: str = "photo.bin", **params: object) -> str:
    return save(photo(), tmp_path / name, "JPEG", **({"quality": 90} | params))


def run(source: str, out: Path, settings: EncodeSettings = DEFAULTS, stem: str = "abc_1_0") -> Compressed:
    out.mkdir(exist_ok=True)
    return compress_file(source, str(out), stem, settings)


def decoded(path: Path | str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im


def opened(out: Path, result: Compressed) -> Image.Image:
    return decoded(out / result.name)


def close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def mean_colour(im: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, ...]:
    return tuple(round(v) for v in ImageStat.Stat(im.crop(box)).mean)


def pixel(im: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = im.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def level(im: Image.Image, xy: tuple[int, int]) -> int:
    value = im.getpixel(xy)
    assert isinstance(value, int)
    return value


def frame_count(path: Path) -> int:
    with Image.open(path) as im:
        return int(getattr(im, "n_frames", 1))


def listing(out: Path) -> list[str]:
    return sorted(os.listdir(out))


def test_default_reencodes_jpeg_at_quality_50_same_size(tmp_path: Path) -> None:
    """A photo becomes a smaller baseline, non-optimised JPEG of the same dimensions at quality 50."""
    source = photo_jpeg(tmp_path)
    out = tmp_path / "out"
    result = run(source, out, PILLOW_PATH)  # byte for byte what Pillow writes (test_requantize: the fast path)

    assert result == Compressed(
        name="abc_1_0.jpg",
        format="JPEG",
        width=600,
        height=400,
        bytes_in=os.path.getsize(source),
        bytes_out=(out / "abc_1_0.jpg").stat().st_size,
        kept_original=False,
        quality=50,
        note="",
        ssim=result.ssim,
    )
    assert result.ssim is not None and 0.5 < result.ssim < 1
    assert result.bytes_out < result.bytes_in
    written = opened(out, result)
    assert (written.format, written.mode, written.size) == ("JPEG", "RGB", (600, 400))
    assert "progressive" not in written.info
    reference = io.BytesIO()
    decoded(source).save(reference, "JPEG", quality=50)
    assert (out / result.name).read_bytes() == reference.getvalue()
    assert listing(out) == ["abc_1_0.jpg"]


def test_progressive_and_optimize_are_honoured(tmp_path: Path) -> None:
    """progressive=True writes a progressive JPEG and optimize=True makes a baseline JPEG smaller."""
    source = photo_jpeg(tmp_path)
    plain = run(source, tmp_path / "plain")
    optimised = run(source, tmp_path / "opt", EncodeSettings(optimize=True))
    progressive = run(source, tmp_path / "prog", EncodeSettings(progressive=True))

    assert optimised.bytes_out < plain.bytes_out
    assert opened(tmp_path / "prog", progressive).info.get("progressive")


def test_exif_orientation_is_applied_and_removed(tmp_path: Path) -> None:
    """An image stored sideways with EXIF orientation 6 is written upright with no orientation tag left."""
    upright = Image.new("RGB", (300, 200), BLUE)
    upright.paste(RED, (0, 0, 150, 100))
    upright = Image.blend(upright, photo((300, 200)), 0.1)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate the stored pixels 90° clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    source = save(stored, tmp_path / "in", "JPEG", quality=95, exif=exif)
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.width, result.height, result.kept_original) == (300, 200, False)
    written = opened(out, result)
    assert written.size == (300, 200)
    assert written.getexif().get(0x0112) in (None, 1)
    assert close(mean_colour(written, (10, 10, 140, 90)), RED, 25)
    assert close(mean_colour(written, (160, 110, 290, 190)), BLUE, 25)
    assert close(mean_colour(written, (160, 10, 290, 90)), BLUE, 25)


def test_icc_profile_is_kept(tmp_path: Path) -> None:
    """The embedded ICC profile of the input is embedded unchanged in the output."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = photo_jpeg(tmp_path, icc_profile=icc)
    out = tmp_path / "out"
    result = run(source, out)

    assert not result.kept_original
    assert opened(out, result).info.get("icc_profile") == icc


CMYK_SWATCHES = [RED, BLUE, (30, 200, 60), (250, 250, 250)]


def cmyk_swatches() -> Image.Image:
    """Four RGB colour bars, 150 px wide each, converted to CMYK."""
    im = Image.new("RGB", (600, 200))
    for i, colour in enumerate(CMYK_SWATCHES):
        im.paste(colour, (i * 150, 0, i * 150 + 150, 200))
    return im.convert("CMYK")


def test_cmyk_without_profile_converts_to_rgb(tmp_path: Path) -> None:
    """A CMYK JPEG without a profile becomes an RGB JPEG whose colours match its RGB appearance."""
    source = save(cmyk_swatches(), tmp_path / "in", "JPEG", quality=95)
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.format, result.kept_original) == ("JPEG", False)
    written = opened(out, result)
    assert written.mode == "RGB"
    for i, colour in enumerate(CMYK_SWATCHES):
        assert close(mean_colour(written, (i * 150 + 20, 20, i * 150 + 130, 180)), colour, 8)


INKS = {"C": (0, 174, 239), "M": (236, 0, 140), "Y": (255, 242, 0), "K": (35, 31, 32)}


def press_rgb(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    """What full-strength ink combinations look like on paper, unlike Pillow's naive 255 - ink."""
    rgb = [255.0, 255.0, 255.0]
    for on, ink in zip((c, m, y, k), INKS.values()):
        if on:
            rgb = [v * i / 255 for v, i in zip(rgb, ink)]
    return (round(rgb[0]), round(rgb[1]), round(rgb[2]))


def cmyk_profile() -> bytes:
    """A minimal ICC v2 CMYK printer profile whose A2B0 table maps each ink corner to press_rgb."""
    corners = [press_rgb(c, m, y, k) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)]
    strip = Image.new("RGB", (16, 1))
    strip.putdata(corners)
    lab = ImageCms.profileToProfile(
        strip, ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), outputMode="LAB"
    )
    assert lab is not None
    clut = b""
    for colour in lab.get_flattened_data():
        assert isinstance(colour, tuple)
        clut += struct.pack(">3H", *(v * 256 for v in colour))  # 8-bit L, a+128, b+128 to ICC v2 16-bit
    identity = struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536)
    ramp = struct.pack(">2H", 0, 65535)
    a2b0 = b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + identity + struct.pack(">HH", 2, 2) + ramp * 4 + clut + ramp * 3
    text = b"test CMYK\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(70)
    d50 = struct.pack(">3i", 63190, 65536, 54061)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"A2B0", a2b0)]
    offset = 128 + 4 + 12 * len(tags)
    table = body = b""
    for signature, blob in tags:
        blob += bytes(-len(blob) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(blob))
        body += blob
    header = (
        struct.pack(">I", offset + len(body)) + bytes(4) + struct.pack(">I", 0x02100000)
        + b"prtrCMYKLab " + bytes(12) + b"acsp" + bytes(24) + bytes(4) + d50 + bytes(48)
    )
    return header + struct.pack(">I", len(tags)) + table + body


def test_cmyk_with_profile_converts_through_the_profile(tmp_path: Path) -> None:
    """A CMYK JPEG with an embedded profile is converted to sRGB through that profile, and the CMYK profile is dropped."""
    im = Image.new("CMYK", (400, 200), (255, 0, 0, 0))  # 100% cyan ink
    im.paste((0, 0, 0, 0), (200, 0, 400, 200))  # bare paper
    source = save(im, tmp_path / "in", "JPEG", quality=95, icc_profile=cmyk_profile())
    out = tmp_path / "out"
    result = run(source, out)

    written = opened(out, result)
    assert (written.mode, result.kept_original) == ("RGB", False)
    assert "icc_profile" not in written.info
    assert close(mean_colour(written, (20, 20, 180, 180)), press_rgb(1, 0, 0, 0), 8)
    assert close(mean_colour(written, (220, 20, 380, 180)), (255, 255, 255), 4)


def test_greyscale_stays_greyscale_jpeg(tmp_path: Path) -> None:
    """An L (greyscale) image is written as a greyscale JPEG."""
    source = save(photo().convert("L"), tmp_path / "in", "PNG")
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.name, result.format, result.kept_original) == ("abc_1_0.jpg", "JPEG", False)
    assert opened(out, result).mode == "L"


def test_palette_without_transparency_becomes_rgb_jpeg(tmp_path: Path) -> None:
    """A palette PNG without transparency is written as an RGB JPEG."""
    source = save(photo().quantize(256), tmp_path / "in", "PNG")
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.format, result.kept_original) == ("JPEG", False)
    assert opened(out, result).mode == "RGB"


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG around mid-grey comes out mid-grey in an 8-bit greyscale JPEG."""
    rng = random.Random(2)
    values = array("H", (32768 + rng.randint(-3000, 3000) for _ in range(300 * 200)))
    im = Image.frombytes("I;16", (300, 200), values.tobytes())
    source = save(im, tmp_path / "in", "PNG")
    assert decoded(source).mode.startswith("I")
    out = tmp_path / "out"
    result = run(source, out)

    written = opened(out, result)
    assert (written.mode, result.kept_original) == ("L", False)
    assert 122 <= ImageStat.Stat(written).mean[0] <= 133


def test_sixteen_bit_greyscale_transparency_is_kept(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG with a tRNS colour key becomes a WebP where that grey is transparent."""
    rng = random.Random(3)
    values = array("H", (20000 + rng.randint(0, 20000) for _ in range(300 * 200)))
    for y in range(100):
        values[y * 300 : y * 300 + 100] = array("H", [5] * 100)
    im = Image.frombytes("I;16", (300, 200), values.tobytes())
    source = save(im, tmp_path / "in", "PNG", transparency=5)
    out = tmp_path / "out"
    result = run(source, out)

    written = opened(out, result)
    assert (result.format, written.mode) == ("WEBP", "RGBA")
    assert pixel(written, (50, 50))[3] == 0
    assert pixel(written, (200, 150))[3] == 255


def plain_pbm(size: tuple[int, int]) -> bytes:
    """A 1-bit image in the ASCII PBM format: 100 px squares in a checkerboard."""
    width, height = size
    rows = (" ".join("1" if (x // 100 + y // 100) % 2 else "0" for x in range(width)) for y in range(height))
    return f"P1\n{width} {height}\n".encode() + "\n".join(rows).encode() + b"\n"


def test_one_bit_image_becomes_greyscale_jpeg(tmp_path: Path) -> None:
    """A 1-bit image whose file is bigger than a JPEG is written as a greyscale JPEG with its black and white intact."""
    source = tmp_path / "in"
    source.write_bytes(plain_pbm((600, 400)))
    assert decoded(source).mode == "1"
    out = tmp_path / "out"
    result = run(str(source), out)

    written = opened(out, result)
    assert (result.format, written.mode, written.size) == ("JPEG", "L", (600, 400))
    assert level(written, (50, 50)) > 240  # PBM 0 is white
    assert level(written, (150, 50)) < 15


def test_one_bit_png_is_kept_when_jpeg_is_bigger(tmp_path: Path) -> None:
    """A compact 1-bit PNG is kept as is because a JPEG of it would be larger."""
    source = tmp_path / "in"
    source.write_bytes(plain_pbm((600, 400)))
    png = save(decoded(source), tmp_path / "png", "PNG")
    out = tmp_path / "out"
    result = run(png, out)

    assert (result.name, result.format, result.kept_original) == ("abc_1_0.png", "PNG", True)
    assert (out / result.name).read_bytes() == Path(png).read_bytes()


def transparent_image(mode: str) -> tuple[Image.Image, dict[str, object]]:
    """A photo whose top-left 100x100 corner is fully transparent, in the given transparency flavour."""
    base = photo()
    alpha = Image.new("L", base.size, 255)
    alpha.paste(0, (0, 0, 100, 100))
    if mode == "RGBA":
        base.putalpha(alpha)
        return base, {}
    if mode == "LA":
        grey = base.convert("L")
        return Image.merge("LA", (grey, alpha)), {}
    palette = base.quantize(255)
    colours = palette.getpalette()
    assert colours is not None
    palette.putpalette(colours[: 255 * 3] + [0, 0, 0])  # add index 255 for transparency
    palette.paste(255, (0, 0, 100, 100))
    return palette, {"transparency": 255}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_kept_as_webp(tmp_path: Path, mode: str) -> None:
    """An image that uses transparency (alpha channel or palette tRNS) becomes a WebP with alpha at the quality."""
    im, params = transparent_image(mode)
    source = save(im, tmp_path / "in", "PNG", **params)
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.name, result.format, result.quality, result.kept_original) == ("abc_1_0.webp", "WEBP", 50, False)
    written = opened(out, result)
    assert (written.format, written.mode, written.size) == ("WEBP", "RGBA", (600, 400))
    assert pixel(written, (50, 50))[3] == 0
    assert pixel(written, (300, 300))[3] == 255


def test_transparent_image_too_wide_for_webp_is_kept(tmp_path: Path) -> None:
    """A transparent image wider than WebP's 16383 px limit keeps its original bytes instead of failing."""
    im = Image.new("RGBA", (16_400, 8), (*RED, 255))
    im.paste((0, 0, 0, 0), (0, 0, 100, 8))
    source = save(im, tmp_path / "in", "PNG")
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.name, result.kept_original, result.note) == ("abc_1_0.png", True, "too large for WEBP, original kept")
    assert (out / result.name).read_bytes() == Path(source).read_bytes()


def test_opaque_alpha_is_treated_as_opaque(tmp_path: Path) -> None:
    """An RGBA image whose alpha is fully opaque is written as an RGB JPEG."""
    im = photo()
    im.putalpha(255)
    source = save(im, tmp_path / "in", "PNG")
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.name, result.format) == ("abc_1_0.jpg", "JPEG")
    assert opened(out, result).mode == "RGB"


def animation(fmt: str, frames: int, size: tuple[int, int] = (64, 48)) -> bytes:
    colours = [RED, BLUE, (30, 200, 60)]
    images = [Image.new("RGB", size, colours[i % 3]) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, fmt, save_all=True, append_images=images[1:], duration=40, loop=0)
    return buffer.getvalue()


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "abc_1_0.gif"), ("PNG", "abc_1_0.png"), ("WEBP", "abc_1_0.webp")])
def test_animated_images_are_kept_as_is(tmp_path: Path, fmt: str, name: str) -> None:
    """Animated GIF, APNG and animated WebP are written byte for byte with their own extension."""
    data = animation(fmt, 3)
    source = tmp_path / "in"
    source.write_bytes(data)
    out = tmp_path / "out"
    result = run(str(source), out)

    assert result == Compressed(
        name=name,
        format=fmt,
        width=64,
        height=48,
        bytes_in=len(data),
        bytes_out=len(data),
        kept_original=True,
        quality=None,
        note="animated image kept as is (not scored)",
        ssim=None,
    )
    assert (out / name).read_bytes() == data
    assert frame_count(out / name) == 3


def test_a_multi_page_tiff_is_compressed_from_its_first_page(tmp_path: Path) -> None:
    """A TIFF with a second page (say, a thumbnail) is no animation: its first page is compressed to a JPEG of the
    same size, not kept byte for byte as "animated"."""
    first, thumbnail = photo(), Image.new("RGB", (64, 48), BLUE)
    source = save(first, tmp_path / "in", "TIFF", save_all=True, append_images=[thumbnail])
    with Image.open(source) as check:
        assert check.n_frames == 2
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.name, result.format, result.kept_original, result.note) == ("abc_1_0.jpg", "JPEG", False, "")
    assert (result.width, result.height) == first.size
    assert result.bytes_out < result.bytes_in
    assert opened(out, result).getpixel((10, 10)) != BLUE


def test_gif_with_thousands_of_frames_is_kept_quickly(tmp_path: Path) -> None:
    """A 3000-frame GIF is kept byte for byte with every frame."""
    data = animation("GIF", 3000, (16, 16))
    source = tmp_path / "in"
    source.write_bytes(data)
    out = tmp_path / "out"
    result = run(str(source), out)

    assert result.kept_original and (out / result.name).read_bytes() == data
    assert frame_count(out / result.name) == 3000


def test_decompression_bomb_is_rejected_before_decoding(tmp_path: Path) -> None:
    """A 40000x40000 PNG is rejected by our pixel limit from its header, and no Pillow bomb warning escapes."""
    source = tmp_path / "bomb.png"
    source.write_bytes(bomb_png(40_000, 40_000))
    assert source.stat().st_size < 400_000
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageRejected) as caught:
            run(str(source), out)

    assert str(caught.value) == "image too large: 1,600,000,000 pixels exceeds the limit of 50,000,000"
    assert listing(out) == []


def test_our_pixel_limit_replaces_pillows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our max_pixels decides alone: Pillow's global limit (1000 here) plays no part and is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    source = photo_jpeg(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(source, tmp_path / "ok").width == 600
        with pytest.raises(ImageRejected, match=r"^image too large: 240,000 pixels exceeds the limit of 239,999$"):
            run(source, tmp_path / "no", EncodeSettings(max_pixels=239_999))
    assert Image.MAX_IMAGE_PIXELS == 1000


def refusal_and_peak_kb(source: str, out: str, max_pixels: int) -> tuple[str, int]:
    """(in a fresh process) Why compress_file refused `source`, and the process's peak resident memory in KB."""
    try:
        compress_file(source, out, "abc_1_0", EncodeSettings(max_pixels=max_pixels))
        reason = "accepted"
    except ImageRejected as exc:
        reason = str(exc)
    # VmHWM, not getrusage's ru_maxrss: that one keeps the peak of the process this one was forked from.
    status = Path("/proc/self/status").read_text()
    return reason, int(status.split("VmHWM:", 1)[1].split()[0])


def test_an_icon_holding_a_huge_png_is_refused_before_the_png_is_decoded(tmp_path: Path) -> None:
    """An ICO whose directory says 16x16 but holds a 6000x6000 PNG is refused by the pixel limit before the PNG is
    decoded: Pillow decodes an icon's picture while opening the file, before any check of ours could run."""
    inner = io.BytesIO()
    Image.new("RGB", (6000, 6000)).save(inner, "PNG")
    png = inner.getvalue()
    source = tmp_path / "icon.ico"
    source.write_bytes(struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        reason, peak_kb = pool.submit(refusal_and_peak_kb, str(source), str(tmp_path / "out"), 1_000_000).result()
    assert reason == "image too large: 36,000,000 pixels exceeds the limit of 1,000,000"
    assert peak_kb < 100_000  # decoded, its pixels alone would be 108 MB


def test_exif_that_does_not_parse_leaves_the_image_as_it_is(tmp_path: Path) -> None:
    """A PNG whose EXIF block is not TIFF data is compressed unrotated, not rejected as corrupt."""
    source = save(photo(), tmp_path / "in.png", "PNG", exif=b"Exif\x00\x00garbage-not-tiff")
    result = run(source, tmp_path / "out")
    assert (result.format, result.width, result.height, result.kept_original) == ("JPEG", 600, 400, False)


def test_larger_reencode_keeps_original_bytes(tmp_path: Path) -> None:
    """A JPEG saved at quality 30 would grow at 50, so its original bytes are written instead."""
    source = photo_jpeg(tmp_path, quality=30)
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.name, result.format, result.kept_original, result.quality) == ("abc_1_0.jpg", "JPEG", True, None)
    assert result.note == "re-encoded output was not smaller"
    assert result.bytes_out == result.bytes_in
    assert (out / result.name).read_bytes() == Path(source).read_bytes()


def test_small_png_is_kept_with_png_extension(tmp_path: Path) -> None:
    """A flat-colour PNG smaller than any JPEG of it is kept under the .png extension."""
    source = save(Image.new("RGB", (600, 400), BLUE), tmp_path / "in", "PNG")
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.name, result.format, result.kept_original) == ("abc_1_0.png", "PNG", True)
    assert (out / result.name).read_bytes() == Path(source).read_bytes()


def test_kept_original_reports_upright_dimensions(tmp_path: Path) -> None:
    """A kept original stored sideways reports its upright width and height."""
    exif = Image.Exif()
    exif[0x0112] = 6
    source = save(photo((400, 600)), tmp_path / "in", "JPEG", quality=30, exif=exif)
    result = run(source, tmp_path / "out")

    assert result.kept_original
    assert (result.width, result.height) == (600, 400)


def test_target_ratio_finds_highest_quality_within_budget(tmp_path: Path) -> None:
    """target_ratio=0.5 writes at most half the input bytes, at the highest quality that fits."""
    source = photo_jpeg(tmp_path)
    out = tmp_path / "out"
    result = run(source, out, EncodeSettings(target_ratio=0.5))

    budget = 0.5 * result.bytes_in
    assert not result.kept_original
    assert result.bytes_out <= budget
    assert result.quality is not None and 5 <= result.quality < 95
    one_better = io.BytesIO()
    decoded(source).save(one_better, "JPEG", quality=result.quality + 1)
    assert len(one_better.getvalue()) > budget


def test_unreachable_target_ratio_uses_smallest_output(tmp_path: Path) -> None:
    """When even quality 5 misses the target, the quality-5 output is written and its note says so."""
    source = photo_jpeg(tmp_path)
    result = run(source, tmp_path / "out", EncodeSettings(target_ratio=0.001))

    assert (result.quality, result.kept_original) == (5, False)
    assert result.bytes_out < result.bytes_in
    assert result.note == (f"target ratio not reachable: the smallest output (quality 5) is "
                           f"{result.bytes_out / result.bytes_in:.2f} of the input")


def truncated_jpeg(tmp_path: Path) -> bytes:
    data = Path(photo_jpeg(tmp_path)).read_bytes()
    return data[: len(data) // 2]


def truncated_png(tmp_path: Path) -> bytes:
    data = Path(save(photo(), tmp_path / "whole.png", "PNG")).read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda _: b"", r"^empty body \(0 bytes\)$"),
        (lambda _: b"\n  <!DOCTYPE html><html><body>Not found</body></html>", r"^not an image: content looks like HTML$"),
        (lambda _: b"<html><head></head></html>", r"^not an image: content looks like HTML$"),
        (lambda _: b'{"error": "forbidden"}', r"^not an image \(unrecognised format\)$"),
        (truncated_jpeg, r"^truncated or corrupt image: image file is truncated"),
        (truncated_png, r"^truncated or corrupt image: "),
        (lambda _: b"\x89PNG\r\n\x1a\n", r"^truncated or corrupt image: "),
        (lambda _: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", r"^unsupported image format: EPS$"),
    ],
    ids=["empty", "html-doctype", "html", "json", "truncated-jpeg", "truncated-png", "png-signature-only", "eps"],
)
def test_bad_input_is_rejected_clearly_and_writes_nothing(
    tmp_path: Path, make: Callable[[Path], bytes], message: str
) -> None:
    """Empty, non-image and truncated bodies raise ImageRejected with a clear reason and write nothing."""
    source = tmp_path / "in"
    source.write_bytes(make(tmp_path))
    out = tmp_path / "out"
    with pytest.raises(ImageRejected, match=message):
        run(str(source), out)
    assert listing(out) == []
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_float_image_in_unit_range_is_scaled(tmp_path: Path) -> None:
    """A 32-bit float TIFF holding 0..1 becomes greyscale scaled to 0..255 rather than clipped to black."""
    source = save(Image.linear_gradient("L").resize((300, 200)).point(lambda v: v / 255, "F"), tmp_path / "in", "TIFF")
    out = tmp_path / "out"
    result = run(source, out)

    written = opened(out, result)
    assert (result.format, written.mode) == ("JPEG", "L")
    assert 120 <= ImageStat.Stat(written).mean[0] <= 135


def test_long_source_comment_does_not_break_encoding(tmp_path: Path) -> None:
    """Source comments are not copied, so a GIF comment longer than a JPEG marker can hold is harmless."""
    source = save(photo().quantize(256), tmp_path / "in", "GIF", comment=b"x" * 70_000)
    assert len(decoded(source).info["comment"]) == 70_000
    out = tmp_path / "out"
    result = run(source, out)

    assert (result.format, result.kept_original) == ("JPEG", False)
    assert "comment" not in opened(out, result).info


def test_retry_overwrites_the_same_name(tmp_path: Path) -> None:
    """Compressing again replaces the earlier output under the same name and leaves no temp file."""
    source = photo_jpeg(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "abc_1_0.jpg").write_bytes(b"stale half-written file")
    first = run(source, out)
    second = run(source, out)

    assert first == second
    assert listing(out) == ["abc_1_0.jpg"]
    assert (out / "abc_1_0.jpg").stat().st_size == second.bytes_out


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    """When the final rename fails the error propagates and the temp file is removed."""
    source = photo_jpeg(tmp_path)
    out = tmp_path / "out"
    (out / "abc_1_0.jpg").mkdir(parents=True)
    (out / "abc_1_0.jpg" / "occupied").write_bytes(b"")
    with pytest.raises(OSError):
        run(source, out)
    assert listing(out) == ["abc_1_0.jpg"]


def test_works_in_a_process_pool(tmp_path: Path) -> None:
    """compress_file runs in a ProcessPoolExecutor worker, and its result and its rejections pickle back."""
    good = photo_jpeg(tmp_path)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    # spawn: the worker must import everything by name, as it would under any start method.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = pool.submit(compress_file, good, str(out), "a", DEFAULTS).result()
        with pytest.raises(ImageRejected, match=r"^empty body \(0 bytes\)$"):
            pool.submit(compress_file, str(empty), str(out), "b", DEFAULTS).result()

    assert isinstance(result, Compressed) and result.name == "a.jpg"
    assert listing(out) == ["a.jpg"]

def test_a_missing_output_folder_is_made_again_and_a_missing_body_says_so(tmp_path: Path) -> None:
    """An images folder removed while the daemon runs is made again for the next output; a body that is gone raises
    BodyGone (not a FileNotFoundError that could be the output's), so only that case reads "the body is gone"."""
    source = photo_jpeg(tmp_path)
    out = tmp_path / "images"  # never made: as if removed by hand
    result = compress_file(source, str(out), "abc_1_0", DEFAULTS)
    assert (out / result.name).stat().st_size == result.bytes_out > 0
    with pytest.raises(BodyGone):
        compress_file(str(tmp_path / "gone"), str(out), "abc_1_1", DEFAULTS)
