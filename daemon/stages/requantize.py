"""The JPEG fast path: a JPEG going out as JPEG is recompressed in the DCT domain (its coefficients requantized to
the tables Pillow's encoder would write at that quality) instead of decoded to pixels and encoded again.

Taken only where it gives what decoding + encoding would (see `eligible`); the compiled part is the optional
extension daemon/stages/_requantize.c against the system's libjpeg-turbo. Without it, or with
compress.jpeg_fast_path = false, every image takes the Pillow path.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, JpegImagePlugin

try:
    import daemon.stages._requantize as _requantize
except ImportError:  # not built: no compiler or libjpeg headers at install time (setup.py: optional=True)
    _requantize = None  # type: ignore[assignment]

_SUBSAMPLING_420 = 2  # JpegImagePlugin.get_sampling's code for 4:2:0, what Pillow's encoder writes at any quality
_ORIENTATION = 0x0112
_TRANSPOSING = range(2, 9)  # EXIF orientations ImageOps.exif_transpose applies


class RequantizeFailed(Exception):
    """libjpeg would not take these bytes as they are (damaged data, a layout it cannot copy): decode instead."""


def available() -> bool:
    """True when the extension was compiled and imports."""
    return _requantize is not None


@dataclass(frozen=True)
class Source:
    """What the fast path needs to know of an eligible JPEG, read from its header."""

    width: int
    height: int
    mode: str  # "RGB" (YCbCr) or "L"
    icc: bytes | None  # its embedded profile, if any


def eligible(data: bytes, max_pixels: int) -> Source | None:
    """The header of a JPEG the fast path may take, else None: 8-bit baseline or progressive, YCbCr 4:2:0 or
    greyscale (no colour conversion or chroma resampling to do), no EXIF orientation to apply, within max_pixels.
    Reads the header only; anything unusual (including a header Pillow cannot read) is left to the Pillow path."""
    if not available() or not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over max_pixels is refused below
            im = Image.open(io.BytesIO(data))
        if not isinstance(im, JpegImagePlugin.JpegImageFile) or im.format != "JPEG":  # not an MPO's extra pictures
            return None
        width, height = im.size
        if width * height > max_pixels or im.mode not in ("RGB", "L"):
            return None
        if im.mode == "RGB" and JpegImagePlugin.get_sampling(im) != _SUBSAMPLING_420:
            return None
        if _orientation(im) in _TRANSPOSING:
            return None
        icc = im.info.get("icc_profile")
        return Source(width, height, im.mode, icc if isinstance(icc, bytes) and icc else None)
    except Exception:  # Pillow's parsers raise many types on hostile headers: the Pillow path words the error
        return None


def _orientation(im: Image.Image) -> int:
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # EXIF that does not parse says nothing of orientation (as ImageOps.exif_transpose reads it)
        return 1
    return orientation if isinstance(orientation, int) else 1


def requantize(data: bytes, quality: int, optimize: bool, progressive: bool, max_pixels: int,
               icc: bytes | None) -> bytes:
    """`data` recompressed at `quality` (libjpeg's standard tables scaled as jpeg_set_quality does, as Pillow's
    encoder writes them), with `icc` as its only marker besides JFIF. Raises RequantizeFailed."""
    return _run(data, quality, optimize, progressive, max_pixels, icc)[0]


def requantize_scored(data: bytes, quality: int, optimize: bool, progressive: bool, max_pixels: int,
                      icc: bytes | None) -> tuple[bytes, float]:
    """`requantize` and the luma's SSIM between `data` and the result over 8x8 blocks, computed from the DCT
    coefficients while requantizing (no pixels decoded): a score's level differs from one with a 7x7 or Gaussian
    window over pixels (see docs/performance.md), so compare it only with scores computed the same way."""
    payload, score, _, _ = _run(data, quality, optimize, progressive, max_pixels, icc, score=True)
    assert score is not None
    return payload, score


class Requantizer:
    """One JPEG requantized at whatever qualities are asked (a target's search tries several). With `reduce` (2, 4
    or 8) each call also keeps the luma of the source and of that output at 1/reduce of their size, made by the
    extension from the coefficients it holds anyway, for a score that decodes neither file again."""

    def __init__(self, data: bytes, size: tuple[int, int], optimize: bool, progressive: bool, max_pixels: int,
                 icc: bytes | None, reduce: int = 0) -> None:
        self.data, self.optimize, self.progressive, self.max_pixels, self.icc = data, optimize, progressive, \
            max_pixels, icc
        self.reduce = reduce
        self.plane_size = (-(-size[0] // reduce), -(-size[1] // reduce)) if reduce else (0, 0)
        self._before: Image.Image | None = None
        self._after: dict[int, tuple[bytes, Image.Image]] = {}  # by id() of the payload, which it keeps alive

    def __call__(self, quality: int) -> bytes:
        payload, _, before, after = _run(self.data, quality, self.optimize, self.progressive, self.max_pixels,
                                         self.icc, reduce=self.reduce)
        if before is not None and after is not None:
            self._before = Image.frombytes("L", self.plane_size, before)
            self._after[id(payload)] = (payload, Image.frombytes("L", self.plane_size, after))
        return payload

    def before(self) -> Image.Image:
        """The source's luma, reduced (after the first call)."""
        assert self._before is not None, "before() needs a call with reduce first"
        return self._before

    def after(self, payload: bytes) -> Image.Image:
        """The luma of `payload`, an output of this requantizer, reduced."""
        return self._after[id(payload)][1]


def _run(data: bytes, quality: int, optimize: bool, progressive: bool, max_pixels: int, icc: bytes | None,
         score: bool = False, reduce: int = 0) -> tuple[bytes, float | None, bytes | None, bytes | None]:
    assert _requantize is not None, "requantize() needs the extension: check available() first"
    try:
        return _requantize.requantize(data, quality, optimize, progressive, max_pixels, icc, score, reduce)
    except _requantize.JpegError as exc:
        raise RequantizeFailed(str(exc)) from None


def reduced(data: bytes, denominator: int, mode: str = "L") -> Image.Image:
    """A JPEG decoded at 1/denominator of its size (2, 4 or 8) by libjpeg's scaled IDCT (Pillow's draft mode):
    a fraction of a full decode's cost, for scoring what the fast path never decodes. Raises RequantizeFailed."""
    if denominator not in (1, 2, 4, 8):
        raise ValueError(f"libjpeg scales by 1/1, 1/2, 1/4 or 1/8, not 1/{denominator}")
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        im.draft(mode, (max(1, width // denominator), max(1, height // denominator)))
        im.load()
    except (MemoryError, Image.DecompressionBombError):
        raise
    except Exception as exc:  # Pillow raises many types on damaged data
        raise RequantizeFailed(f"{type(exc).__name__}: {exc}") from None
    return im if im.mode == mode else im.convert(mode)
