"""The optional C extension (daemon/stages/_requantize.c, the JPEG fast path); everything else is in pyproject.toml.

optional=True: where it cannot be compiled (no compiler, no libjpeg headers) the install still succeeds and the
daemon compresses every image through Pillow (daemon.stages.requantize.available() is then False)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "daemon.stages._requantize",
            sources=["daemon/stages/_requantize.c"],
            libraries=["jpeg", "m"],  # the system's libjpeg-turbo (Debian: libjpeg62-turbo-dev)
            # -fopenmp-simd: only `#pragma omp simd` (the score's sums vectorised), no OpenMP runtime.
            extra_compile_args=["-O2", "-std=c11", "-fopenmp-simd"],
            optional=True,
        )
    ]
)
