"""Builds the Cython extensions in gateway/_native/ and compiles shadow/model.py with Cython
(cythonized at build time, never committed; the .py stays the source and imports uncompiled).

Set IOTGW_DEBUG=1 for a debug build: bounds checks on, line tracing and annotated HTML.
Set IOTGW_BUILD_ONLY=mqtt (a module name) to rebuild just that extension while developing it:
`IOTGW_BUILD_ONLY=mqtt python setup.py build_ext --inplace`.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("IOTGW_DEBUG") == "1"
ONLY = os.environ.get("IOTGW_BUILD_ONLY")

directives = {
    "language_level": 3,
    "embedsignature": True,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "linetrace": DEBUG,
}

macros = [("CYTHON_TRACE", "1")] if DEBUG else []
native = Path("gateway") / "_native"
extensions = [
    Extension(
        f"gateway._native.{pyx.stem}",
        [str(pyx)],
        define_macros=macros,
        extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
    )
    for pyx in sorted(native.glob("*.pyx"))
    if ONLY is None or pyx.stem == ONLY
]
# The shadow package's write path (the model, the store logic and the Redis store) is plain
# Python compiled in pure-Python mode: Python indexing, annotations not turned into C types,
# so the sources stay importable uncompiled and behave the same. (Compiled, a Redis store
# update() costs a tenth fewer instructions. shadow/resp.py, shared with the cluster, stays
# interpreted.) shadow/model.pxd adds C
# declarations for the model's internal helpers (direct C calls, _Write a C class); it types
# only what the model itself builds, never what callers pass.
pure = [
    Extension(
        f"shadow.{name}",
        [str(Path("shadow") / f"{name}.py")],
        define_macros=macros,
        extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
    )
    for name in ("model", "store", "redis")
]
pure = [ext for ext in pure if ONLY is None or ext.name.rsplit(".", 1)[1] == ONLY]
pure_directives = {
    **directives,
    "boundscheck": True,
    "wraparound": True,  # negative indexes as in Python
    "annotation_typing": False,
    "binding": True,
}

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG)
    + (cythonize(pure, compiler_directives=pure_directives, annotate=DEBUG) if pure else [])
)
