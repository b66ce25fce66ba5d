"""Builds the Cython kernel and the frame fast path (ext/) into the engine
package. (The load generator's loop is benchmark tooling: bench/build_loadgen.py
builds it on demand.)"""
import os
import pathlib

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# SCANPAY_KERNEL_DEBUG=1 builds the kernel with its invariant checks (the
# test suite's build, see .ci/run); unset or 0 builds the release kernel
# (benchmarks, production), where the checks compile to nothing.
KERNEL_DEBUG = os.environ.get("SCANPAY_KERNEL_DEBUG", "0") == "1"
MODE_HEADER = pathlib.Path(__file__).parent / "ext" / "kernel" / "mode.h"


def write_mode_header() -> bool:
    """Write ext/kernel/mode.h for this build; True if the mode changed (then
    the kernel is regenerated and recompiled, not reused from the other mode)."""
    text = ("/* Written by setup.py from SCANPAY_KERNEL_DEBUG; not edited by hand. */\n"
            f"#define SCANPAY_KERNEL_DEBUG {int(KERNEL_DEBUG)}\n")
    if MODE_HEADER.exists() and MODE_HEADER.read_text() == text:
        return False
    MODE_HEADER.write_text(text)
    return True


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
    # The client's hot path (engine/client/__init__.py; engine/_client_py.py is its twin).
    cython_extension("_client", "client.pyx"),
    # Precision marketing's read-only passes over the tables (engine/core/segments.py).
    cython_extension("_marketing", "marketing.pyx"),
    # Byte planes of record batches in the replicated stream (engine/replication/packing.py).
    cython_extension("_packing", "packing.pyx"),
]

mode_changed = write_mode_header()
setup(
    ext_modules=cythonize(
        extensions,
        force=mode_changed,
        include_path=["ext"],
        compiler_directives={"language_level": "3"},
    ),
)
