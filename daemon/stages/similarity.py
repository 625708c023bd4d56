"""How close a re-encoded image looks to the pixels it was encoded from: SSIM on luma (Wang et al. 2004).

The standard setting, as scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255): an 11x11 Gaussian window (sigma 1.5, cut at 3.5 sigma), K1 0.01,
K2 0.03, the mean over every window that lies wholly inside the image. Runs in the codec's pool workers, in the
compiled daemon/stages/_similarity.c where it was built (the same arithmetic, three to four times faster), else in
numpy here.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from PIL import Image

try:
    import daemon.stages._similarity as _compiled
except ImportError:  # not built: no compiler at install time (setup.py: optional=True)
    _compiled = None  # type: ignore[assignment]

SIGMA = 1.5
RADIUS = int(3.5 * SIGMA + 0.5)  # scipy's gaussian_filter truncation, which scikit-image uses
WINDOW = 2 * RADIUS + 1
_C1 = np.float32((0.01 * 255) ** 2)
_C2 = np.float32((0.03 * 255) ** 2)
# Rows are scored in strips of about this many pixels: the four float32 planes of a strip stay in the CPU's cache,
# and memory stays bounded whatever the image's size (a 50 MP image would need 800 MB as whole planes).
_STRIP_PIXELS = 1 << 17

Plane = npt.NDArray[np.uint8]
Floats = npt.NDArray[np.float32]


def compiled() -> bool:
    """True when the SSIM extension was built (else numpy scores, the same, slower)."""
    return _compiled is not None


def _kernel() -> Floats:
    offsets = np.arange(-RADIUS, RADIUS + 1, dtype=np.float64)
    weights = np.exp(-(offsets**2) / (2 * SIGMA**2))
    kernel: Floats = (weights / weights.sum()).astype(np.float32)
    return kernel


_KERNEL = _kernel()


def luma(im: Image.Image) -> Image.Image:
    """The L plane people see: ITU-R 601 luma, an image with alpha first composited on white (a product page)."""
    if im.mode == "L":
        return im
    if im.mode == "RGBA":
        # Luma is linear in R, G and B, so compositing the luma plane is compositing the colours, in a quarter of
        # the memory (8-bit planes, not RGBA copies).
        return Image.composite(im.convert("L"), Image.new("L", im.size, 255), im.getchannel("A"))
    return im.convert("L")


def reduction(size: tuple[int, int], max_side: int) -> int | None:
    """The factor that brings the longer side to at most `max_side` (0: full resolution): 2, 4 or 8, the scales a
    JPEG decoder reduces by as it decodes (and the fast path by its coefficients), else a multiple of 8; never below
    one window a side. None when even full resolution is smaller than one window."""
    width, height = size
    if min(width, height) < WINDOW:
        return None
    needed = math.ceil(max(width, height) / max_side) if max_side else 1
    factor = 1 << (needed - 1).bit_length() if needed <= 8 else 8 * math.ceil(needed / 8)
    return max(1, min(factor, min(width, height) // WINDOW))


class Reference:
    """The luma an encode is scored against, made once per image for every encode tried (target_ssim's search)."""

    def __init__(self, im: Image.Image, max_side: int, size: tuple[int, int] | None = None) -> None:
        """`im` is the image itself or, with the image's `size`, a JPEG of it decoded to `draft_size` (the fast
        path, daemon.stages.requantize, never decodes the rest)."""
        self.size = size or im.size
        self.factor = reduction(self.size, max_side)
        # A JPEG decoder reduces by 2, 4 or 8 as it decodes, for a fraction of a full decode's cost.
        self.decoder_factor = math.gcd(self.factor or 1, 8)
        reduced_by = 1 if im.size == self.size else self.decoder_factor
        self.plane: Plane | None = None if self.factor is None else _plane(luma(im), self.factor // reduced_by)

    @property
    def draft_size(self) -> tuple[int, int]:
        """The size to ask a JPEG decoder for (Image.draft): reduced by `decoder_factor`, the rest is done here."""
        return self.size[0] // self.decoder_factor, self.size[1] // self.decoder_factor

    def score(self, encoded: Image.Image) -> float | None:
        """The SSIM of the `encoded` image, decoded in full or to `draft_size`, against this reference; None for an
        image too small to score."""
        if self.plane is None or self.factor is None:
            return None
        decoded_factor = 1 if encoded.size == self.size else self.decoder_factor
        return ssim(self.plane, _plane(luma(encoded), self.factor // decoded_factor))


def _plane(im: Image.Image, factor: int) -> Plane:
    return np.asarray(im.reduce(factor) if factor > 1 else im, dtype=np.uint8)


def ssim(reference: Plane, distorted: Plane) -> float:
    """Mean SSIM of two luma planes of one shape, each side at least WINDOW pixels."""
    if reference.shape != distorted.shape:
        raise ValueError(f"planes differ in shape: {reference.shape} and {distorted.shape}")
    height, width = reference.shape
    rows, columns = height - 2 * RADIUS, width - 2 * RADIUS
    if rows < 1 or columns < 1:
        raise ValueError(f"a plane of {width}x{height} is smaller than one {WINDOW}x{WINDOW} window")
    if _compiled is not None:
        return _compiled.ssim(np.ascontiguousarray(reference), np.ascontiguousarray(distorted), width, height)
    return numpy_ssim(reference, distorted)


def numpy_ssim(reference: Plane, distorted: Plane) -> float:
    """ssim in numpy, where the extension was not built: the planes' rows in strips, four float32 blurs each."""
    height, width = reference.shape
    rows, columns = height - 2 * RADIUS, width - 2 * RADIUS
    per_strip = max(1, _STRIP_PIXELS // width)
    total = 0.0
    for top in range(0, rows, per_strip):
        bottom = min(rows, top + per_strip) + 2 * RADIUS
        total += _strip_sum(reference[top:bottom], distorted[top:bottom])
    return float(total / (rows * columns))


def _strip_sum(reference: Plane, distorted: Plane) -> float:
    """The sum of the SSIM map over the windows wholly inside this strip of rows."""
    # The two variances only ever appear summed, so x*x + y*y is blurred as one plane: four blurs, not five.
    planes = np.empty((4, *reference.shape), dtype=np.float32)
    x, y, squares, products = planes
    x[...] = reference
    y[...] = distorted
    np.multiply(x, x, out=squares)
    squares += y * y
    np.multiply(x, y, out=products)
    mean_x, mean_y, mean_squares, mean_products = _blur(_blur(planes, 2), 1)
    means = mean_x * mean_y
    mean_x *= mean_x
    mean_y *= mean_y
    mean_x += mean_y  # now the sum of the squared means
    numerator = (2 * means + _C1) * (2 * (mean_products - means) + _C2)
    denominator = (mean_x + _C1) * (mean_squares - mean_x + _C2)
    return float((numerator / denominator).sum(dtype=np.float64))


def _blur(planes: Floats, axis: int) -> Floats:
    """The Gaussian-weighted sum along `axis` at every place where the whole window fits (a 'valid' correlation);
    the kernel is symmetric, so mirrored taps are added before they are weighted."""
    length = planes.shape[axis] - 2 * RADIUS

    def tap(i: int) -> Floats:
        index: list[slice] = [slice(None)] * planes.ndim
        index[axis] = slice(i, i + length)
        return planes[tuple(index)]

    out: Floats = tap(RADIUS) * _KERNEL[RADIUS]
    pair = np.empty_like(out)
    for i in range(RADIUS):
        np.add(tap(i), tap(2 * RADIUS - i), out=pair)
        pair *= _KERNEL[i]
        out += pair
    return out
