"""Packaging glue: maps the top-level `kernels/` folder to `onelayer_fast.kernels`.

The C++ planner in `csrc/` is built here once it exists (pybind11 + ninja, no CUDA needed);
until then there is nothing to compile and the package is pure Python.
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def extension_modules() -> list:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [Pybind11Extension("onelayer_fast._planner", sources, cxx_std=17)]


setup(
    packages=["onelayer_fast", "onelayer_fast.tasks", "onelayer_fast.kernels"],
    package_dir={"onelayer_fast.kernels": "kernels"},
    ext_modules=extension_modules(),
)
