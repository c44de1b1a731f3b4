"""Builds the native GRU kernel (grulab.kernels._native) at install time when it can.

It needs torch importable while building, so install with
``pip install --no-build-isolation`` after torch (the Makefile does). Without
torch or a C++ compiler the install still succeeds, and grulab compiles the
kernel on first use instead (grulab/kernels/native.py says so on stderr).
"""
import sys
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    print("grulab: torch is not importable in this build environment; the native GRU kernel "
          "will be compiled on first use (install with --no-build-isolation to build it now)",
          file=sys.stderr)
else:
    sys.path.insert(0, str(Path(__file__).parent / "src"))
    from grulab.kernels.native import CFLAGS, LDFLAGS  # the flags live in one place  # noqa: E402

    sys.path.pop(0)

    class OptionalBuild(BuildExtension):
        """Never fail the install over the kernel: first use builds it instead."""

        def run(self):
            print("grulab: compiling the native GRU kernel (about a minute) ...", file=sys.stderr, flush=True)
            try:
                super().run()
            except Exception as exc:  # no compiler, ...
                print(f"grulab: the native GRU kernel was not built ({exc}); it will be compiled "
                      f"on first use", file=sys.stderr)

    csrc = sorted(str(p) for p in Path("src/grulab/kernels/csrc").glob("*.cpp"))
    ext_modules = [CppExtension("grulab.kernels._native", csrc, extra_compile_args=CFLAGS, extra_link_args=LDFLAGS)]
    cmdclass = {"build_ext": OptionalBuild.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
