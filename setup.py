"""Builds the Cython kernel, the frame fast path and the load generator loop
(ext/) into the engine package."""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "engine._kernel",
        ["ext/kernel.pyx"],
        include_dirs=[np.get_include(), "ext"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "engine._framing",
        ["ext/framing.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    # The load generator's event loop (bench/loadgen.py): built with the
    # engine so that benchmarks need no build step of their own.
    Extension(
        "engine._loadgen",
        ["ext/loadgen.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O2"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={"language_level": "3"},
    ),
)
