"""The JPEG fast path (daemon.stages.requantize) against decode + encode, on generated photographs."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image, ImageCms
from skimage import data as photographs

from daemon.stages import requantize
from daemon.stages.codec import NOT_SMALLER_NOTE, Compressed, EncodeSettings, ImageRejected, compress_file
from daemon.testing import fine_grain_photo, jpeg_bytes, smooth_photo, ssim

# Without the extension these skip, unless CI requires it (.ci/run): then they fail.
if not requantize.available() and os.environ.get("IMGPIPE_TEST_REQUIRE_REQUANTIZE") != "1":
    pytest.skip("the JPEG fast path's extension is not built (it needs a C compiler and libjpeg-turbo's headers, "
                "e.g. Debian's libjpeg62-turbo-dev, then `make install`)", allow_module_level=True)

DEFAULTS = EncodeSettings()
Run = Callable[..., tuple[Compressed, bytes]]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """Compress bytes through the real codec, on the fast path or (fast=False) forced onto the Pillow path."""

    def compress(data: bytes, fast: bool = True, settings: EncodeSettings = DEFAULTS) -> tuple[Compressed, bytes]:
        assert requantize.available(), "the extension did not import"
        settings = replace(settings, jpeg_fast_path=fast)
        source = tmp_path / "body"
        source.write_bytes(data)
        out = tmp_path / ("fast" if fast else "pillow")
        out.mkdir(exist_ok=True)
        result = compress_file(str(source), str(out), "abc_1_0", settings)
        return result, (out / result.name).read_bytes()

    return compress


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im


def photograph(name: str) -> bytes:
    """One of scikit-image's sample photographs (the test extra's), as a camera would save it: quality 90, 4:2:0."""
    return jpeg_bytes(Image.fromarray(getattr(photographs, name)()), quality=90)


PHOTOS = {
    "rocket": lambda: photograph("rocket"),
    "coffee": lambda: photograph("coffee"),
    "smooth": lambda: jpeg_bytes(smooth_photo(1000, 750, seed=1), quality=90),
    "fine grain": lambda: jpeg_bytes(fine_grain_photo(1000, 750, seed=2), quality=90),
    "odd size, progressive": lambda: jpeg_bytes(smooth_photo(803, 597, seed=3), quality=90, progressive=True),
    "greyscale": lambda: jpeg_bytes(fine_grain_photo(640, 480, seed=4).convert("L"), quality=90),
}


@pytest.mark.parametrize("kind", PHOTOS)
def test_fast_path_looks_like_decode_and_encode(run: Run, kind: str) -> None:
    """Each kind of photo comes out requantized, same size and mode, within 0.002 SSIM and 5% bytes of Pillow's,
    and scored as the Pillow path scores it."""
    data = PHOTOS[kind]()
    fast, fast_bytes = run(data)
    pillow, pillow_bytes = run(data, fast=False)
    assert fast_bytes != pillow_bytes  # not Pillow's output: the fast path wrote it
    assert (fast.format, fast.quality, fast.kept_original, fast.note) == ("JPEG", 50, False, "")
    assert (fast.width, fast.height) == (pillow.width, pillow.height)
    original, fast_image, pillow_image = decoded(data), decoded(fast_bytes), decoded(pillow_bytes)
    assert (fast_image.size, fast_image.mode) == (original.size, original.mode)
    assert fast_image.quantization == pillow_image.quantization  # the tables Pillow writes at quality 50
    assert "progressive" not in fast_image.info  # the output is baseline, as settings say, whatever came in
    assert abs(ssim(original, fast_image) - ssim(original, pillow_image)) <= 0.002
    assert len(fast_bytes) <= 1.05 * len(pillow_bytes)
    assert fast.ssim is not None and pillow.ssim is not None and abs(fast.ssim - pillow.ssim) <= 0.002


@pytest.mark.parametrize("quality", [10, 35, 75, 95])
def test_tables_are_pillows_at_every_quality(quality: int) -> None:
    """The quantization tables written are those Pillow's encoder writes at the same quality."""
    photo = smooth_photo(64, 48)
    data = jpeg_bytes(photo, quality=100)
    ours = decoded(requantize.requantize(data, quality, False, False, 50_000_000, None))
    assert ours.quantization == decoded(jpeg_bytes(photo, quality=quality)).quantization


def test_icc_kept_exif_dropped_as_on_the_pillow_path(run: Run) -> None:
    """An RGB profile is kept byte for byte and EXIF is dropped, on both paths alike."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "Camera maker"
    data = jpeg_bytes(smooth_photo(800, 600), quality=90, icc_profile=icc, exif=exif.tobytes(), comment=b"hello")
    _, fast_bytes = run(data)
    _, pillow_bytes = run(data, fast=False)
    assert fast_bytes != pillow_bytes
    fast, pillow = decoded(fast_bytes), decoded(pillow_bytes)
    assert fast.info.get("icc_profile") == pillow.info.get("icc_profile") == icc
    assert "exif" not in fast.info and "exif" not in pillow.info
    assert "comment" not in fast.info


def test_optimize_and_progressive_settings_are_followed(run: Run) -> None:
    """optimize gives a smaller file and progressive a progressive one, as on the Pillow path."""
    data = PHOTOS["smooth"]()
    _, plain = run(data)
    _, optimized = run(data, settings=EncodeSettings(optimize=True))
    result, progressive = run(data, settings=EncodeSettings(progressive=True))
    assert len(optimized) < len(plain)
    assert decoded(progressive).info.get("progressive") == 1
    assert decoded(progressive).tobytes() == decoded(plain).tobytes()  # the same coefficients, differently ordered
    assert result.quality == 50


def test_never_larger_than_the_original(run: Run) -> None:
    """A quality-30 JPEG asked for quality 50 is kept as it is on the fast path too."""
    data = jpeg_bytes(smooth_photo(400, 300), quality=30)
    result, written = run(data)
    assert (result.kept_original, result.quality, result.note) == (True, None, NOT_SMALLER_NOTE)
    assert written == data


TARGETS = {"ratio": EncodeSettings(target_ratio=0.2), "ssim": EncodeSettings(target_ssim=0.95),
           "scored at full size": EncodeSettings(ssim_max_side=0)}


@pytest.mark.parametrize("target", TARGETS)
def test_searches_and_full_size_scores_take_the_pillow_path(run: Run, target: str) -> None:
    """A quality search, or a score at full resolution, gets exactly the Pillow path's output and score."""
    data = PHOTOS["smooth"]()
    assert run(data, settings=TARGETS[target]) == run(data, fast=False, settings=TARGETS[target])


def test_unscored_small_image_takes_the_fast_path(run: Run) -> None:
    """With the score off, an image too small to score reduced is requantized too."""
    data = jpeg_bytes(smooth_photo(300, 200), quality=90)
    fast, fast_bytes = run(data, settings=EncodeSettings(ssim=False))
    pillow, pillow_bytes = run(data, fast=False, settings=EncodeSettings(ssim=False))
    assert fast_bytes != pillow_bytes
    assert (fast.width, fast.height, fast.quality, fast.ssim) == (pillow.width, pillow.height, 50, None)


def rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(smooth_photo(800, 600), quality=90, exif=exif.tobytes())


NOT_TAKEN = {
    "EXIF orientation 6": lambda: rotated(6),
    "CMYK": lambda: jpeg_bytes(smooth_photo(800, 600).convert("CMYK"), quality=90),
    "4:4:4": lambda: jpeg_bytes(smooth_photo(800, 600), quality=90, subsampling="4:4:4"),
    "4:2:2": lambda: jpeg_bytes(smooth_photo(800, 600), quality=90, subsampling="4:2:2"),
    "PNG": lambda: png(smooth_photo(800, 600)),
}


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("kind", NOT_TAKEN)
def test_images_the_fast_path_must_not_take_go_through_pillow(run: Run, kind: str) -> None:
    """An image needing rotation, colour conversion or other chroma sampling gets exactly the Pillow path's output."""
    data = NOT_TAKEN[kind]()
    assert requantize.eligible(data, DEFAULTS.max_pixels) is None
    fast, fast_bytes = run(data)
    pillow, pillow_bytes = run(data, fast=False)
    assert (fast, fast_bytes) == (pillow, pillow_bytes)


def test_orientation_one_is_taken() -> None:
    """EXIF orientation 1 (nothing to apply) is no reason to decode."""
    assert requantize.eligible(rotated(1), DEFAULTS.max_pixels) is not None


CORRUPT = {
    "truncated": lambda data: data[: len(data) // 2],
    "header only": lambda data: data[:600],
    "scrambled scan": lambda data: data[:2000] + bytes(b ^ 0x5A for b in data[2000:6000]) + data[6000:],
}


@pytest.mark.parametrize("damage", CORRUPT)
def test_corrupt_jpeg_gets_the_same_outcome_on_both_paths(run: Run, damage: str,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """Damaged JPEG data fails (or is kept) with the very same error on both paths, and libjpeg prints nothing."""
    data = CORRUPT[damage](PHOTOS["smooth"]())
    outcomes = []
    for fast in (True, False):
        try:
            outcomes.append(run(data, fast=fast))
        except ImageRejected as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    if damage == "truncated":
        assert str(outcomes[0]).startswith("truncated or corrupt image: image file is truncated")
    assert capfd.readouterr().err == ""


def test_extension_raises_on_damaged_data_without_output(capfd: pytest.CaptureFixture[str]) -> None:
    """The extension itself turns libjpeg's errors and warnings into a Python exception, printing nothing."""
    data = PHOTOS["smooth"]()
    for damaged in (data[: len(data) // 2], data[:100], b"\xff\xd8\xff" + bytes(50), b""):
        with pytest.raises(requantize.RequantizeFailed):
            requantize.requantize(damaged, 50, False, False, 50_000_000, None)
    assert capfd.readouterr() == ("", "")


def test_bomb_refused_from_the_header(run: Run) -> None:
    """Over max_pixels the extension refuses before reading coefficients, and the user sees the usual error."""
    data = PHOTOS["smooth"]()
    with pytest.raises(requantize.RequantizeFailed, match="pixel limit"):
        requantize.requantize(data, 50, False, False, 1000 * 750 - 1, None)
    with pytest.raises(ImageRejected, match=r"image too large: 750,000 pixels exceeds the limit of 749,999"):
        run(data, settings=EncodeSettings(max_pixels=749_999))


@pytest.mark.parametrize("kind", ["smooth", "fine grain"])
def test_score_from_coefficients_tracks_pixel_ssim(kind: str) -> None:
    """From quality 35 up, the score computed while requantizing is within 0.01 of SSIM over the decoded pixels."""
    data = PHOTOS[kind]()
    original = decoded(data)
    scores = []
    for quality in (35, 50, 80):
        payload, score = requantize.requantize_scored(data, quality, False, False, 50_000_000, None)
        assert payload == requantize.requantize(data, quality, False, False, 50_000_000, None)
        assert abs(score - ssim(original, decoded(payload))) < 0.01
        scores.append(score)
    assert scores == sorted(scores) and scores[0] < scores[-1]


@pytest.mark.parametrize("denominator", [2, 4, 8])
def test_planes_from_coefficients_are_libjpegs_reduced_decode(denominator: int) -> None:
    """The lumas the extension makes while requantizing are libjpeg's reduced decodes of both files, to a level."""
    data = PHOTOS["odd size, progressive"]()
    encoder = requantize.Requantizer(data, (803, 597), False, False, 50_000_000, None, denominator)
    payload = encoder(50)
    for plane, decoded_reduced in ((encoder.before(), requantize.reduced(data, denominator)),
                                   (encoder.after(payload), requantize.reduced(payload, denominator))):
        assert (plane.mode, plane.size) == ("L", (-(-803 // denominator), -(-597 // denominator)))
        assert decoded_reduced.size == plane.size
        assert max(abs(a - b) for a, b in zip(plane.tobytes(), decoded_reduced.tobytes())) <= 1
