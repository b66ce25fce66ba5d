"""Builds the Cython kernel, the frame fast path and the load generator loop
(ext/) into the engine package."""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def cython_extension(name: str, source: str, optimize: str = "-O3") -> Extension:
    return Extension(
        f"engine.{name}",
        [f"ext/{source}"],
        include_dirs=[np.get_include(), "ext"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=[optimize],
    )


extensions = [
    cython_extension("_kernel", "kernel.pyx"),
    cython_extension("_framing", "framing.pyx"),
    cython_extension("_outlet", "outlet.pyx"),
    # The client's hot path (engine/client.py; engine/_client_py.py is its twin).
    cython_extension("_client", "client.pyx"),
    # The load generator's event loop (bench/loadgen.py): built with the
    # engine so that benchmarks need no build step of their own.
    cython_extension("_loadgen", "loadgen.pyx", "-O2"),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={"language_level": "3"},
    ),
)
