"""Packaging glue: maps the top-level `kernels/` folder to `onelayer_fast.kernels` and builds the C++ planner.

`csrc/*.cpp` is compiled into `onelayer_fast._planner` (a pybind11 module, plain C++17, no CUDA, no torch
headers) by setuptools' own `build_ext`, which invokes the platform C++ compiler directly; pybind11 and
ninja come from [build-system] requires. setuptools does not drive ninja (only torch's BuildExtension does,
and that would pull torch into the isolated build environment); with a single translation unit ninja would
buy neither parallelism nor incremental rebuilds here anyway: build_ext already skips an up-to-date module.
A C++17 compiler is required: there is no pure-Python fallback at run time (onelayer_fast/planner.py).
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def extension_modules() -> list:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError as error:  # only without build isolation: [build-system] requires lists pybind11
        raise SystemExit(f"building onelayer_fast._planner needs pybind11>=2.12: pip install pybind11 ({error})")
    # Pybind11Extension adds -fvisibility=hidden, -g0 and the C++ standard flag; -O3 -DNDEBUG come from
    # Python's own CFLAGS.
    return [Pybind11Extension("onelayer_fast._planner", sources, cxx_std=17)]


setup(
    packages=["onelayer_fast", "onelayer_fast.tasks", "onelayer_fast.kernels"],
    package_dir={"onelayer_fast.kernels": "kernels"},
    ext_modules=extension_modules(),
)
