"""Builds the C++ CPU backend moelora._C from csrc/ (everything else is declared in pyproject.toml).

torch must be importable at build time (the README's commands install it first and build without
isolation). Without torch or a working compiler the package still installs as pure Python: the `auto`
backend then falls back to the reference with one warning and `MOELORA_BACKEND=cpu` raises.
"""

import glob
import sys

from setuptools import setup


def _warn(message: str) -> None:
    print(f"moelora: {message}; the C++ CPU backend will be unavailable", file=sys.stderr)


ext_modules = []
cmdclass = {}
sources = sorted(glob.glob("csrc/*.cpp"))
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    if sources:
        _warn("torch is not importable at build time")
else:

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves a pure-Python install instead of failing the whole install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler missing or failing: any error means no extension
                _warn(f"building {ext.name} failed ({type(e).__name__}: {e})")

    if sources:
        # -fno-trapping-math lets gcc vectorise the clamps in csrc/common.h's fast_exp (torch builds with it too).
        flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
        ext_modules = [CppExtension("moelora._C", sources, extra_compile_args=flags)]
        cmdclass = {"build_ext": OptionalBuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
