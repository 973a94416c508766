"""Build of the native extension fastpref._C (CMake + pybind11, no libtorch).

Metadata lives in pyproject.toml. Environment knobs:
  FASTPREF_SKIP_BUILD=1        pure-Python install, no native extension
  FASTPREF_CPU_ARCH=generic    no -march=native (default: native)
  CMAKE_BUILD_PARALLEL_LEVEL   passed through to `cmake --build`
A failing native build fails the install: it is never skipped silently.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name, sourcedir=ROOT):
        # `depends` (paths relative to the project) also puts the native sources into sdists
        native = [ROOT / "CMakeLists.txt", *sorted((ROOT / "csrc").glob("*"))]
        super().__init__(name, sources=[], depends=[p.relative_to(ROOT).as_posix() for p in native])
        self.sourcedir = str(Path(sourcedir).resolve())


def _cmake_exe():
    try:  # the `cmake` PyPI package (present in isolated builds)
        import cmake

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError(
            "fastpref: building the native extension needs CMake >= 3.18 "
            "(pip install cmake), or set FASTPREF_SKIP_BUILD=1 for a pure-Python install"
        )
    return exe


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        arch = os.environ.get("FASTPREF_CPU_ARCH", "native")
        if arch not in ("native", "generic"):
            raise RuntimeError(f"FASTPREF_CPU_ARCH must be 'native' or 'generic', got {arch!r}")
        cfg = "Debug" if self.debug else "Release"
        cmake = _cmake_exe()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={extdir}{os.sep}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-DFASTPREF_CPU_ARCH={arch}",
        ]
        # one CMake cache per toolchain: isolated builds bring their own cmake and
        # pybind11 into a throwaway env, and must not reuse an editable build's cache
        key = hashlib.sha1("\0".join([sys.executable, cmake, pybind11.get_cmake_dir(), arch]).encode())
        build_temp = Path(self.build_temp) / f"{ext.name}-{key.hexdigest()[:10]}"
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        build_args = ["--build", ".", "--config", cfg]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += ["--parallel", str(os.cpu_count() or 1)]
        subprocess.run([cmake, *build_args], cwd=build_temp, check=True)


skip = os.environ.get("FASTPREF_SKIP_BUILD", "").strip().lower() in ("1", "true", "yes", "on")

setup(
    ext_modules=[] if skip else [CMakeExtension("fastpref._C")],
    cmdclass={"build_ext": CMakeBuild},
)
