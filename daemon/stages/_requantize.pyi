# The C extension's interface (daemon/stages/_requantize.c), for mypy.

class JpegError(ValueError): ...

def requantize(data: bytes, quality: int, optimize: bool = False, progressive: bool = False,
               max_pixels: int = 50_000_000, icc: bytes | None = None, score: bool = False, reduce: int = 0
               ) -> tuple[bytes, float | None, bytes | None, bytes | None]: ...
