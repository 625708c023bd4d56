# The C extension's interface (daemon/stages/_similarity.c), for mypy.
import numpy as np
import numpy.typing as npt

Plane = npt.NDArray[np.uint8] | bytes

def ssim(reference: Plane, distorted: Plane, width: int, height: int) -> float: ...
