"""Builds the optional C++ CPU backend moelora._C from csrc/ when csrc/ holds sources.

Everything else is declared in pyproject.toml. Without sources in csrc/, or without torch at build time,
the package installs as pure Python and the `auto` backend falls back to the reference.
"""

import glob
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob("csrc/*.cpp"))
if sources:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("moelora: torch is not importable at build time; skipping the C++ backend moelora._C", file=sys.stderr)
    else:
        ext_modules = [CppExtension("moelora._C", sources, extra_compile_args=["-O3", "-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
