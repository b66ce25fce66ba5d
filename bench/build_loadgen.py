"""Builds the load generator's Cython loop (bench/_loadgen.pyx) on demand.

The loop is benchmark tooling, not part of the product: `pip install` does
not build it and `engine` does not ship it. The first `import_loop()` of a
given source compiles it (Cython and a C compiler, as the engine's own build
needs) into a cache directory keyed by the source's hash; later imports
reuse the build. SCANPAY_BENCH_BUILD sets the cache directory (default: the
system temp directory).
"""
import hashlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "_loadgen.pyx"
BUILD_TIMEOUT_S = 600

SETUP = """
import sys
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
source, build_lib, build_temp = sys.argv[1:4]
setup(script_args=["build_ext", "--build-lib", build_lib, "--build-temp", build_temp, "-q"],
      ext_modules=cythonize([Extension("_loadgen", [source], include_dirs=[np.get_include()],
                                       extra_compile_args=["-O2"])],
                            compiler_directives={"language_level": "3"}, quiet=True,
                            build_dir=build_temp))
"""


def cache_dir() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + sys.version.encode()).hexdigest()[:16]
    root = Path(os.environ.get("SCANPAY_BENCH_BUILD", tempfile.gettempdir()))
    return root / f"scanpay-loadgen-{key}"


def built_module(out: Path) -> Path | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    path = out / f"_loadgen{suffix}"
    return path if path.exists() else None


def build(out: Path) -> Path:
    """Compile into a fresh directory, then rename it into place, so that
    concurrent builds never import a half-written module."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    proc = subprocess.run([sys.executable, "-c", SETUP, str(SOURCE), str(work), str(work / "tmp")],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0 or built_module(work) is None:
        raise RuntimeError(f"building {SOURCE} failed:\n{proc.stderr[-3000:]}")
    try:
        work.rename(out)
    except OSError:             # another process built it first: use theirs
        pass
    return built_module(out) or built_module(work)


def import_loop():
    """The compiled `_loadgen` module, built first if this source is new."""
    out = cache_dir()
    path = built_module(out) or build(out)
    spec = importlib.util.spec_from_file_location("_loadgen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
