"""Packaging glue: maps the top-level `kernels/` folder to `onelayer_fast.kernels` and builds the C++ planner.

`csrc/*.cpp` is compiled into `onelayer_fast._planner` (a pybind11 module, plain C++17, no CUDA, no torch
headers) by ninja: `NinjaBuildExt` writes a build.ninja into build_ext's temp folder (one object per source,
then one link) and runs the `ninja` executable; pybind11 and ninja come from [build-system] requires. Ninja
compiles the sources in parallel, tracks header dependencies (-MMD) and the command lines, and skips what is
up to date: a second `python setup.py build_ext --inplace` reports "ninja: no work to do".
A C++17 compiler (c++, or $CXX) is required: there is no pure-Python fallback at run time
(onelayer_fast/planner.py).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()

# What pybind11's Pybind11Extension would add, spelled out: its C++ standard, hidden symbols (pybind11 requires
# them so that two modules built against different pybind11 versions cannot clash), no debug info (smaller
# module); plus the optimisation Python's own CFLAGS would bring, and -fPIC for a shared object.
CXXFLAGS = ["-std=c++17", "-fvisibility=hidden", "-g0", "-O3", "-DNDEBUG", "-fPIC", "-Wall"]


def ninja_executable() -> str:
    """The `ninja` binary of the ninja package (the build requirement), else one on PATH."""
    try:
        import ninja

        candidate = Path(ninja.BIN_DIR) / "ninja"
        if candidate.is_file():
            return str(candidate)
    except ImportError:  # only without build isolation: [build-system] requires lists ninja
        pass
    found = shutil.which("ninja")
    if found is None:
        raise SystemExit("building onelayer_fast._planner needs ninja: pip install ninja (or build with "
                         "`pip install -e .`, which installs the build requirements itself)")
    return found


def escape(path: str | Path) -> str:
    """A path as a build.ninja target or input: '$', ' ' and ':' are ninja syntax."""
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def command_args(args: list[str]) -> str:
    """Arguments for a ninja command variable: quoted for the shell, '$' escaped for ninja."""
    return " ".join(shlex.quote(a) for a in args).replace("$", "$$")


def build_ninja(ext: Extension, build_dir: Path, output: Path) -> str:
    """build.ninja text: compile each source of `ext` to an object in `build_dir`, link them into `output`."""
    try:
        import pybind11
    except ImportError as error:  # only without build isolation: [build-system] requires lists pybind11
        raise SystemExit(f"building onelayer_fast._planner needs pybind11>=2.12: pip install pybind11 ({error})")
    paths = sysconfig.get_paths()
    includes = [pybind11.get_include(), paths["include"], paths["platinclude"], *ext.include_dirs]
    cxxflags = CXXFLAGS + [f"-I{d}" for d in dict.fromkeys(includes)] + shlex.split(os.environ.get("CXXFLAGS", ""))
    # An extension module does not link libpython: the interpreter that imports it provides those symbols
    # (macOS has to be told to leave them unresolved).
    ldflags = ["-shared"] + (["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else [])
    ldflags += shlex.split(os.environ.get("LDFLAGS", ""))
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {command_args(shlex.split(os.environ.get('CXX', 'c++')))}",
        f"cxxflags = {command_args(cxxflags + ext.extra_compile_args)}",
        f"ldflags = {command_args(ldflags + ext.extra_link_args)}",
        "",
        # -MMD writes the headers each object includes; `deps = gcc` makes ninja rebuild when one changes
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $cxxflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $out",
        "rule link",
        "  command = $cxx $in -o $out $ldflags",
        "  description = LINK $out",
        "",
    ]
    objects = []
    for source in ext.sources:
        obj = build_dir / (Path(source).stem + ".o")
        lines.append(f"build {escape(obj)}: cxx {escape(ROOT / source)}")
        objects.append(escape(obj))
    lines.append(f"build {escape(output)}: link {' '.join(objects)}")
    return "\n".join(lines) + "\n"


class NinjaBuildExt(build_ext):
    """build_ext whose compile and link steps are one ninja run per extension.

    Only build_extension is replaced: setuptools still picks the output path (build/lib... or, for --inplace
    and editable installs, a copy into the package) and handles the rest of the command.
    """

    def build_extension(self, ext: Extension) -> None:
        if sys.platform == "win32":  # the rules above are GCC / Clang command lines
            raise SystemExit("building onelayer_fast._planner with ninja needs g++ or clang++ (Linux, macOS)")
        build_dir = Path(self.build_temp).resolve() / ext.name
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        build_file = build_dir / "build.ninja"
        text = build_ninja(ext, build_dir, output)
        if not build_file.is_file() or build_file.read_text() != text:  # leave an unchanged file's mtime alone
            build_file.write_text(text)
        # -j follows build_ext's --parallel when given; ninja's own default (cores + 2) otherwise
        jobs = ["-j", str(self.parallel)] if isinstance(self.parallel, int) and self.parallel > 0 else []
        if subprocess.run([ninja_executable(), "-C", str(build_dir), *jobs]).returncode != 0:
            raise SystemExit(f"building {ext.name} failed: see the compiler output above ({build_file})")


def extension_modules() -> list[Extension]:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    return [Extension("onelayer_fast._planner", sources, language="c++")] if sources else []


setup(
    # models/data holds files, not code; listing it as a package is how setuptools ships a data folder
    packages=["onelayer_fast", "onelayer_fast.tasks", "onelayer_fast.models", "onelayer_fast.models.data",
              "onelayer_fast.kernels"],
    package_dir={"onelayer_fast.kernels": "kernels"},
    # The embedded toy-arith base model's weights (6 MB, float32): load_model("toy-arith") reads them.
    package_data={"onelayer_fast.models.data": ["toy-arith/*"]},
    ext_modules=extension_modules(),
    cmdclass={"build_ext": NinjaBuildExt},
)
