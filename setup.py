"""The optional C extensions; everything else is in pyproject.toml.

optional=True: where one cannot be compiled (no compiler, no libjpeg headers) the install still succeeds and the
daemon does without it: daemon/stages/_requantize.c is the JPEG fast path (without it every image goes through
Pillow: daemon.stages.requantize.available() is False), daemon/stages/_similarity.c the SSIM score (without it
numpy computes the same score, slower)."""

from setuptools import Extension, setup

# -fopenmp-simd: only `#pragma omp simd` (sums and row loops vectorised), no OpenMP runtime.
FLAGS = ["-O2", "-std=c11", "-fopenmp-simd"]

setup(
    ext_modules=[
        Extension(
            "daemon.stages._requantize",
            sources=["daemon/stages/_requantize.c"],
            libraries=["jpeg", "m"],  # the system's libjpeg-turbo (Debian: libjpeg62-turbo-dev)
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "daemon.stages._similarity",
            sources=["daemon/stages/_similarity.c"],
            libraries=["m"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
    ]
)
