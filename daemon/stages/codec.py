"""The CPU side of the compress stage: decode one downloaded body, re-encode it, write it atomically.

Runs inside the pool's worker processes (stages.pool), so everything public is top-level and trades only
picklable values (str paths, frozen dataclasses). No asyncio; the only network is the write to an object store.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from daemon.events import Compressed
from daemon.stages import requantize
from daemon.stages.similarity import Reference, reduction
from daemon.storage import FolderStore, ImageStore


@dataclass(frozen=True)
class EncodeSettings:
    quality: int = 50
    target_ratio: float = 0.0  # 0 = off; else output at most this share of the input bytes
    target_ssim: float = 0.0  # 0 = off; else the lowest quality whose score reaches it
    ssim: bool = True  # score each output against its decoded original (daemon.stages.similarity)
    ssim_max_side: int = 256  # the luma is scored reduced to at most this many pixels a side; 0 = full resolution
    optimize: bool = False
    progressive: bool = False
    jpeg_fast_path: bool = True  # daemon.stages.requantize, where it applies and the extension is built
    max_pixels: int = 50_000_000


class ImageRejected(Exception):
    """The bytes are not an image we can compress; str(exc) is a clear user-facing reason."""


class BodyGone(Exception):
    """The downloaded body to compress is not on disk any more (removed by hand, or its folder with it)."""


ANIMATED_NOTE = "animated image kept as is (not scored)"
NOT_SMALLER_NOTE = "re-encoded output was not smaller"
TARGET_MISSED_NOTE = "target ratio not reachable: the smallest output (quality {quality}) is {ratio:.2f} of the input"
TARGET_SSIM_MISSED_NOTE = "target SSIM {target} not reachable: quality {quality} scores {score:.4f}"
ORIGINAL_KEPT = "; it was not smaller, so the original is kept"

_SEARCH_MIN_QUALITY = 5
_SEARCH_MAX_QUALITY = 95
# Hard per-side limits of the encoders; beyond them the original is kept instead of failing.
_MAX_SIDE = {"JPEG": 65_500, "WEBP": 16_383}
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tif"}
# Signatures of formats we know, so a cut-off body reads as corrupt rather than "not an image".
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")
# Pillow would run Ghostscript on these to decode them: not for untrusted downloads.
_REFUSED_FORMATS = frozenset({"EPS"})
_ICC_SPACE = {"L": b"GRAY", "RGB": b"RGB ", "RGBA": b"RGB "}
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")  # in Pillow's message: "Image size (N pixels) exceeds ..."


def warm_up() -> int:
    """Run once per pool worker before the first image: load the format plugins; returns the worker's pid."""
    Image.preinit()
    return os.getpid()


def compress_file(source: str, images: str | ImageStore, stem: str, settings: EncodeSettings) -> Compressed:
    """Compress `source` into `stem.<ext>` in `images` (a folder or a store); raises ImageRejected (writing
    nothing) for bad input, StoreUnavailable when the store did not take it."""
    if stem in ("", ".", "..") or os.path.basename(stem) != stem:
        raise ValueError(f"stem must be a plain file name, got {stem!r}")
    try:
        with open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BodyGone(source) from None
    payload, fmt, width, height, quality, note, score = _compress(data, settings)
    name = stem + _extension(fmt)
    (FolderStore(images) if isinstance(images, str) else images).write(name, payload)
    return Compressed(
        name=name,
        format="JPEG" if fmt == "MPO" else fmt,  # an MPO file is a JPEG with extra pictures appended
        width=width,
        height=height,
        bytes_in=len(data),
        bytes_out=len(payload),
        kept_original=quality is None,
        quality=quality,
        note=note,
        ssim=None if score is None else round(score, 5),
    )


Outcome = tuple[bytes, str, int, int, int | None, str, float | None]


def _compress(data: bytes, settings: EncodeSettings) -> Outcome:
    """Return (payload, format, width, height, quality, note, score); quality is None when the original is kept,
    score None when the image was not scored."""
    fast = _requantized(data, settings)
    if fast is not None:
        return fast
    kept = 1.0 if settings.ssim else None  # the original's own pixels: identical
    im, animated = _decode(data, settings.max_pixels)
    original_format = im.format or ""
    if animated:
        width, height = _upright_size(im)
        return data, original_format, width, height, None, ANIMATED_NOTE, None
    width, height = im.size
    icc = im.info.get("icc_profile")
    try:
        im = _normalise(im, icc)
    except (ValueError, OSError, ImageCms.PyCMSError) as exc:
        raise ImageRejected(f"unsupported image ({original_format} {im.mode}): {_describe(exc)}") from None
    fmt = "WEBP" if im.mode == "RGBA" else "JPEG"
    if max(width, height) > _MAX_SIDE[fmt]:
        return data, original_format, width, height, None, f"too large for {fmt}, original kept", kept
    icc = _kept_icc(icc, im.mode)
    # Scored against the normalised pixels, the ones the encoder was given (already decoded: no second decode).
    reference = Reference(im, settings.ssim_max_side) if settings.ssim or settings.target_ssim else None
    return _chosen(data, original_format, fmt, width, height, settings,
                   lambda quality: _encode(im, fmt, quality, settings, icc), _scorer(reference),
                   scorable=reference is not None and reference.factor is not None)


def _requantized(data: bytes, settings: EncodeSettings) -> Outcome | None:
    """The JPEG fast path (daemon.stages.requantize): what the Pillow path would give, without decoding pixels;
    None where it does not apply."""
    if not settings.jpeg_fast_path or settings.target_ratio > 0 or settings.target_ssim > 0:
        return None  # a search encodes several times: from decoded pixels each costs less than entropy coding twice
    source = requantize.eligible(data, settings.max_pixels)
    if source is None:
        return None
    size = (source.width, source.height)
    factor = reduction(size, settings.ssim_max_side) if settings.ssim else None
    # The score's reduction as a JPEG decoder makes it: the extension makes both lumas so reduced from the
    # coefficients it holds, decoding neither file again. Scored at full size, the pixels are needed anyway.
    reduce = math.gcd(factor, 8) if factor else 0
    if reduce == 1:
        return None
    encoder = requantize.Requantizer(data, size, settings.optimize, settings.progressive, settings.max_pixels,
                                     _kept_icc(source.icc, source.mode), reduce)
    reference = functools.cache(lambda: Reference(encoder.before(), settings.ssim_max_side, size))
    try:
        return _chosen(data, "JPEG", "JPEG", source.width, source.height, settings, encoder,
                       lambda payload: reference().score(encoder.after(payload)) if reduce else None,
                       scorable=factor is not None)
    except requantize.RequantizeFailed:
        return None  # damaged data: the Pillow path gives the result or error it always gave


def _scorer(reference: Reference | None) -> Callable[[bytes], float | None]:
    """The score of an encode, decoded as reduced as the score is, against `reference` (None: not scored)."""
    return lambda payload: reference.score(decoded_output(payload, reference)) if reference else None


def _kept_icc(icc: bytes | None, mode: str) -> bytes | None:
    if icc and icc[16:20] != _ICC_SPACE[mode]:
        return None  # e.g. CMYK already converted to sRGB, whose untagged form is the web default
    return icc


def _chosen(data: bytes, original_format: str, fmt: str, width: int, height: int, settings: EncodeSettings,
            encode_payload: Callable[[int], bytes], score: Callable[[bytes], float | None], scorable: bool) -> Outcome:
    """The encode the settings ask for (a quality, a target ratio or SSIM), scored, or the original when that
    is not smaller."""
    kept = 1.0 if settings.ssim else None

    def encode(quality: int) -> Encoded:
        return Encoded(quality, encode_payload(quality), None)

    def encode_scored(quality: int) -> Encoded:
        payload = encode_payload(quality)
        return Encoded(quality, payload, score(payload))

    note = ""
    aiming = settings.target_ssim > 0 and scorable
    if settings.target_ratio > 0:
        budget = settings.target_ratio * len(data)
        found, met = _search_quality(encode, lambda e: len(e.payload) <= budget, lowest=False,
                                     closeness=lambda e: -len(e.payload))
        if not met:
            note = TARGET_MISSED_NOTE.format(quality=found.quality, ratio=len(found.payload) / len(data))
    elif aiming:
        target = settings.target_ssim
        found, met = _search_quality(encode_scored, lambda e: e.score is not None and e.score >= target,
                                     lowest=True, closeness=lambda e: e.quality)  # none does: quality 95, as documented
        if not met:
            note = TARGET_SSIM_MISSED_NOTE.format(target=target, quality=found.quality, score=found.score)
    else:
        found = encode(settings.quality)
    if len(found.payload) >= len(data):
        return data, original_format, width, height, None, note + ORIGINAL_KEPT if note else NOT_SMALLER_NOTE, kept
    # Scored once the output is chosen: an encode that is not kept costs no score (target_ssim's scored them all).
    final = found.score if aiming else score(found.payload) if settings.ssim else None
    return found.payload, fmt, width, height, found.quality, note, final


def _decode(data: bytes, max_pixels: int) -> tuple[Image.Image, bool]:
    """Open and fully decode `data` (upright); animated images are only opened. Returns (image, animated)."""
    if not data:
        raise ImageRejected("empty body (0 bytes)")
    # Pillow's own check, at our limit and as an error rather than a warning: it runs as soon as a size is read,
    # also for pictures a format decodes while the file is opened (an ICO holding a huge PNG), where no check of
    # ours after Image.open would come in time.
    try:
        with _pixel_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode_within_limit(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_PIXELS.search(str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "the picture"
        raise ImageRejected(f"image too large: {size} exceeds the limit of {max_pixels:,}") from None


@contextlib.contextmanager
def _pixel_limit(pixels: int | None) -> Iterator[None]:
    """Pillow's process-wide limit set to ours for a while, then restored: the rest of the process keeps its own."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decoded_output(payload: bytes, reference: Reference) -> Image.Image:
    """Our own encode decoded for scoring, a JPEG as its luma plane only (no chroma upsampling or colour
    conversion) and reduced by the decoder where the score is. No pixel limit: its pixels were decoded within
    ours already."""
    with _pixel_limit(None), Image.open(io.BytesIO(payload)) as encoded:
        if encoded.format == "JPEG":
            encoded.draft("L", reference.draft_size)
        encoded.load()
        return encoded


def _decode_within_limit(data: bytes) -> tuple[Image.Image, bool]:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(_unidentified_reason(data)) from None
    except (MemoryError, *_BOMBS):
        raise
    except Exception as exc:  # Pillow's parsers raise many types on hostile headers
        raise ImageRejected(f"truncated or corrupt image: {_describe(exc)}") from None
    if im.format in _REFUSED_FORMATS:
        raise ImageRejected(f"unsupported image format: {im.format}")
    try:
        # is_animated peeks at one frame ahead, where n_frames may walk all of them. Only these formats
        # animate in a browser; other frames are not an animation (a TIFF's thumbnail page, a PSD's layers,
        # the extra pictures appended to an MPO camera JPEG), and frame 0 is the picture itself.
        if im.format in _ANIMATED_FORMATS and getattr(im, "is_animated", False):
            return im, True
        im.load()
    except (MemoryError, *_BOMBS):
        raise
    except Exception as exc:
        raise ImageRejected(f"truncated or corrupt image: {_describe(exc)}") from None
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # EXIF that does not parse says nothing of orientation: the pixels are fine as they are
        pass
    return im, False


def _normalise(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Return an L or RGB image (for JPEG) or an RGBA image that really uses its alpha (for WebP)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _from_sixteen_bit(im)
    if mode == "CMYK":
        return _cmyk_to_rgb(im, icc)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        min_alpha, _ = rgba.getchannel("A").getextrema()
        if min_alpha < 255:  # type: ignore[operator]
            return rgba
        return im.convert("L") if mode in ("L", "LA", "La") else rgba.convert("RGB")
    if mode in ("RGB", "L"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode == "F":
        # Float images usually hold 0..1; convert("L") would clip nearly all of it to black.
        if im.getextrema()[1] <= 1.0:  # type: ignore[operator]
            im = im.point(lambda v: v * 255)
        return im.convert("L")
    return im.convert("RGB")


def _from_sixteen_bit(im: Image.Image) -> Image.Image:
    # Pillow's own convert("L") clips 16-bit values at 255 (almost everything turns white),
    # so scale through a 65536-entry table instead; values above 16 bits clamp.
    wide = im if im.mode == "I" else im.convert("I")
    grey = wide.point(_sixteen_to_eight(), "L")
    transparent = im.info.get("transparency")
    if not isinstance(transparent, int):
        return grey
    # Pillow's convert("RGBA") ignores a 16-bit tRNS value, so build the alpha ourselves.
    alpha = wide.point([0 if v == transparent else 255 for v in range(65536)], "L")
    if alpha.getextrema()[0] == 255:
        return grey
    return Image.merge("RGBA", (grey, grey, grey, alpha))


@functools.cache
def _sixteen_to_eight() -> list[int]:
    return [(v * 255 + 32767) // 65535 for v in range(65536)]


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    if icc:
        try:
            converted = ImageCms.profileToProfile(
                im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _srgb(), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # an unusable embedded profile: the naive conversion beats rejecting the image
        else:
            assert converted is not None
            return converted
    return im.convert("RGB")


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _encode(im: Image.Image, fmt: str, quality: int, settings: EncodeSettings, icc: bytes | None) -> bytes:
    buffer = io.BytesIO()
    try:
        if fmt == "JPEG":
            # comment="" stops Pillow copying the source's comment, which may exceed a JPEG marker.
            im.save(
                buffer,
                "JPEG",
                quality=quality,
                optimize=settings.optimize,
                progressive=settings.progressive,
                icc_profile=icc,
                comment="",
            )
        else:
            # WebP has no optimize flag; its slowest, smallest method is the closest equivalent.
            im.save(buffer, "WEBP", quality=quality, method=6 if settings.optimize else 4, icc_profile=icc)
    except (ValueError, OSError) as exc:  # e.g. an ICC profile too big for JPEG markers
        raise ImageRejected(f"cannot re-encode image as {fmt}: {_describe(exc)}") from None
    return buffer.getvalue()


@dataclass(frozen=True)
class Encoded:
    """One encode tried: its quality, bytes and score (None when not scored)."""

    quality: int
    payload: bytes
    score: float | None


def _search_quality(encode: Callable[[int], Encoded], meets: Callable[[Encoded], bool], lowest: bool,
                    closeness: Callable[[Encoded], float]) -> tuple[Encoded, bool]:
    """Binary search over quality 5..95 (7 encodes at most) for the lowest (or highest) quality whose encode meets a
    target that a higher quality meets more easily (or less easily). Returns (that encode, True), or, when none
    meets it, (the encode tried that came closest, False)."""
    low, high = _SEARCH_MIN_QUALITY, _SEARCH_MAX_QUALITY
    best: Encoded | None = None
    closest: Encoded | None = None
    while low <= high:
        quality = (low + high) // 2
        encoded = encode(quality)
        if meets(encoded):
            best = encoded
            low, high = (low, quality - 1) if lowest else (quality + 1, high)
        else:
            if closest is None or closeness(encoded) > closeness(closest):
                closest = encoded
            low, high = (quality + 1, high) if lowest else (low, quality - 1)
    if best is not None:
        return best, True
    assert closest is not None
    return closest, False


def _upright_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # the size is informational; a broken EXIF block must not reject the image
        return width, height
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _unidentified_reason(data: bytes) -> str:
    head = data[:1024].lstrip()[:9].lower()
    if head.startswith((b"<!doctype", b"<html")):
        return "not an image: content looks like HTML"
    if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return "truncated or corrupt image: cannot read the image header"
    return "not an image (unrecognised format)"


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _extension(fmt: str) -> str:
    if fmt in _EXTENSIONS:
        return _EXTENSIONS[fmt]
    for extension, registered in Image.registered_extensions().items():
        if registered == fmt:
            return extension
    return "." + fmt.lower()
