"""The SSIM score, checked against scikit-image's structural_similarity on real photographs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from skimage import data as photographs
from skimage.metrics import structural_similarity

from daemon.stages import similarity
from daemon.stages.codec import ORIGINAL_KEPT, Compressed, EncodeSettings, compress_file
from daemon.stages.similarity import luma, reduction

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
FULL = EncodeSettings(ssim_max_side=0)
TOLERANCE = 0.005
# Rec. 601 luma, written out here rather than taken from Pillow or from daemon.stages.similarity.
LUMA = np.array([0.299, 0.587, 0.114])


def photograph(name: str) -> Image.Image:
    return Image.fromarray(getattr(photographs, name)())


def encoded(im: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def compress(tmp_path: Path, data: bytes, settings: EncodeSettings = FULL) -> tuple[Compressed, bytes]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "source"
    source.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    result = compress_file(str(source), str(out), "abc_1_0", settings)
    return result, (out / result.name).read_bytes()


def seen(data: bytes) -> npt.NDArray[np.float64]:
    """What a viewer sees of an image, as luma: decoded in full, composited on white where it has alpha."""
    with Image.open(io.BytesIO(data)) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    on_white = rgba[..., :3] * alpha + 255 * (1 - alpha)
    return np.asarray(on_white @ LUMA, dtype=np.float64)


def independent(original: npt.NDArray[np.float64], output: npt.NDArray[np.float64]) -> float:
    return float(structural_similarity(original, output, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=255))


@pytest.mark.parametrize("name", PHOTOS)
def test_full_resolution_score_equals_scikit_image_on_photographs(tmp_path: Path, name: str) -> None:
    """A quality-90 JPEG photograph compressed at quality 50 scores what scikit-image gives its decoded pixels."""
    data = encoded(photograph(name), "JPEG", quality=90)
    result, output = compress(tmp_path, data)
    expected = independent(seen(data), seen(output))
    assert result.ssim is not None and expected < 0.99
    assert abs(result.ssim - expected) <= TOLERANCE


@pytest.mark.parametrize(("case", "fmt", "mode"), [
    ("greyscale", "PNG", "L"), ("cmyk", "JPEG", "CMYK"), ("alpha", "PNG", "RGBA"),
])
def test_full_resolution_score_equals_scikit_image_on_other_kinds(tmp_path: Path, case: str, fmt: str,
                                                                  mode: str) -> None:
    """Greyscale, a CMYK JPEG (scored on its RGB conversion) and an image with alpha (WebP, seen on white)."""
    im = photograph("astronaut")
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.radial_gradient("L").resize(im.size))  # opaque in the middle, clear at the corners
    data = encoded(im.convert(mode), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    result, output = compress(tmp_path, data)
    original = seen(encoded(Image.open(io.BytesIO(data)).convert("RGBA" if mode == "RGBA" else "RGB"), "PNG"))
    expected = independent(original, seen(output))
    assert result.format == ("WEBP" if mode == "RGBA" else "JPEG")
    assert result.ssim is not None and expected < 0.99
    assert abs(result.ssim - expected) <= TOLERANCE
    # What is scored is what a viewer sees: the same luma as the independent composite on white, to a level.
    assert np.abs(np.asarray(luma(Image.open(io.BytesIO(data))), dtype=np.float64) - original).max() <= 1


@pytest.mark.parametrize("name", ("coffee", "rocket"))
def test_the_default_scores_a_reduced_luma(tmp_path: Path, name: str) -> None:
    """By default a photograph wider than 256 pixels is scored on its luma reduced by a power of two (box) to at
    most 256 a side, as scikit-image scores those reduced planes; the reduced score is higher than the full one."""
    data = encoded(photograph(name), "JPEG", quality=90)
    result, output = compress(tmp_path, data, EncodeSettings())
    assert reduction(photograph(name).size, 256) == 4

    def reduced(luma: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        height, width = (luma.shape[0] // 4) * 4, (luma.shape[1] // 4) * 4
        return np.asarray(luma[:height, :width].reshape(height // 4, 4, width // 4, 4).mean(axis=(1, 3)))

    expected = independent(reduced(seen(data)), reduced(seen(output)))
    assert result.ssim is not None
    assert abs(result.ssim - expected) <= TOLERANCE
    assert result.ssim > independent(seen(data), seen(output))


@pytest.mark.parametrize(("size", "max_side", "factor"), [
    ((2000, 2000), 256, 8), ((1200, 800), 256, 8), ((600, 400), 256, 4), ((256, 100), 256, 1),
    ((4000, 3000), 256, 16), ((3000, 30), 256, 2), ((600, 400), 0, 1), ((2000, 2000), 512, 4), ((10, 300), 256, None),
])
def test_reduction_is_a_power_of_two_up_to_eight(size: tuple[int, int], max_side: int, factor: int | None) -> None:
    """The scale is what a JPEG decoder reduces by (2, 4, 8), then multiples of 8, never below one window a side."""
    assert reduction(size, max_side) == factor


@pytest.mark.skipif(not similarity.compiled() and os.environ.get("IMGPIPE_TEST_REQUIRE_REQUANTIZE") != "1",
                    reason="the SSIM extension (daemon/stages/_similarity.c) was not built")
@pytest.mark.parametrize("size", ((12, 11), (12, 31), (333, 250), (1024, 683)))
def test_the_compiled_score_equals_numpys(size: tuple[int, int]) -> None:
    """The extension's SSIM gives what the numpy version gives on a photograph and its quality-20 JPEG, any shape."""
    assert similarity.compiled(), "the SSIM extension must be built here"
    original = photograph("astronaut").resize(size)
    distorted = Image.open(io.BytesIO(encoded(original, "JPEG", quality=20)))
    reference, output = np.asarray(luma(original)), np.asarray(luma(distorted))
    compiled = similarity.ssim(reference, output)
    assert abs(compiled - similarity.numpy_ssim(reference, output)) < 1e-6
    assert compiled < 0.99 and similarity.ssim(reference, reference) == pytest.approx(1.0, abs=1e-6)
    assert abs(similarity.ssim(reference[:, 1:], output[:, 1:]) - similarity.numpy_ssim(reference[:, 1:],
                                                                                        output[:, 1:])) < 1e-6


def test_kept_originals_score_one_and_animations_are_not_scored(tmp_path: Path) -> None:
    """A kept original is its own pixels (1.0); an animation kept as is says it was not scored."""
    low = encoded(photograph("chelsea"), "JPEG", quality=30)
    kept, _ = compress(tmp_path, low)
    frames = [Image.new("RGB", (64, 48), colour) for colour in ("red", "blue")]
    animation = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40)
    animated, _ = compress(tmp_path, animation)
    assert (kept.kept_original, kept.ssim) == (True, 1.0)
    assert (animated.kept_original, animated.ssim, animated.note) == (
        True, None, "animated image kept as is (not scored)")


def test_scoring_off_records_no_score(tmp_path: Path) -> None:
    """With compress.ssim off nothing is scored, not even a kept original."""
    result, _ = compress(tmp_path, encoded(photograph("chelsea"), "JPEG", quality=90), EncodeSettings(ssim=False))
    kept, _ = compress(tmp_path, encoded(photograph("chelsea"), "JPEG", quality=30), EncodeSettings(ssim=False))
    assert (result.ssim, result.quality) == (None, 50)
    assert (kept.ssim, kept.kept_original) == (None, True)


@pytest.mark.parametrize("target", (0.9, 0.95))
def test_target_ssim_finds_the_lowest_quality_that_reaches_it(tmp_path: Path, target: float) -> None:
    """The output, decoded and scored by scikit-image, reaches the target; one quality lower does not."""
    im = photograph("astronaut")
    data = encoded(im, "PNG")
    result, output = compress(tmp_path, data, EncodeSettings(ssim_max_side=0, target_ssim=target))
    assert result.quality is not None and 5 < result.quality < 95 and result.note == ""
    assert independent(seen(data), seen(output)) >= target - TOLERANCE
    one_lower = encoded(im, "JPEG", quality=result.quality - 1)
    assert independent(seen(data), seen(one_lower)) < target + TOLERANCE
    plain, _ = compress(tmp_path / "plain", data)
    assert result.ssim is not None and plain.ssim is not None
    assert (result.quality < 50) == (plain.ssim > target)


def test_an_unreachable_target_keeps_quality_95_or_the_original(tmp_path: Path) -> None:
    """When quality 95 misses the target its encode is kept if smaller than the input, else the input, and the
    note says so either way."""
    im = photograph("astronaut")
    lossless = encoded(im, "PNG")
    settings = EncodeSettings(ssim_max_side=0, target_ssim=0.9999)
    result, output = compress(tmp_path, lossless, settings)
    assert (result.quality, result.kept_original) == (95, False)
    assert result.bytes_out < result.bytes_in
    assert result.ssim is not None
    assert result.note == f"target SSIM 0.9999 not reachable: quality 95 scores {result.ssim:.4f}"
    assert abs(result.ssim - independent(seen(lossless), seen(output))) <= TOLERANCE

    small = encoded(im, "JPEG", quality=80)
    kept, _ = compress(tmp_path / "small", small, settings)
    assert (kept.kept_original, kept.quality, kept.ssim, kept.bytes_out) == (True, None, 1.0, len(small))
    assert kept.note.startswith("target SSIM 0.9999 not reachable: quality 95 scores ")
    assert kept.note.endswith(ORIGINAL_KEPT)


def test_a_target_ratio_output_is_scored_too(tmp_path: Path) -> None:
    """target_ratio's chosen encode gets the same score scikit-image gives it."""
    data = encoded(photograph("rocket"), "PNG")
    result, output = compress(tmp_path, data, EncodeSettings(ssim_max_side=0, target_ratio=0.05))
    assert result.quality is not None and result.ssim is not None
    assert abs(result.ssim - independent(seen(data), seen(output))) <= TOLERANCE


def test_an_image_smaller_than_one_window_is_not_scored(tmp_path: Path) -> None:
    """Under 11 pixels a side there is no window to score: no score, and a target falls back to the quality."""
    tiny = encoded(photograph("coffee").resize((40, 10)), "PNG")
    result, _ = compress(tmp_path, tiny)
    aimed, _ = compress(tmp_path / "aimed", tiny, EncodeSettings(target_ssim=0.95))
    assert (result.ssim, result.quality) == (None, 50)
    assert (aimed.ssim, aimed.quality, aimed.note) == (None, 50, "")
