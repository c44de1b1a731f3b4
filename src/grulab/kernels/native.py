"""The native GRU kernel (``csrc/``): where it comes from and how it is built.

It is normally compiled when grulab is installed (``make demo`` / ``make test``
run ``pip install --no-build-isolation``, and ``setup.py`` builds the
extension ``grulab.kernels._native`` whenever torch and a C++ compiler are present).
The build is for every x86-64 CPU at once: the loops are compiled once per
instruction set with target attributes, and :mod:`grulab.kernels` picks one at
run time from cpuid (no ``-march=native``, no ``-ffast-math``).

If the installed extension is missing or does not load (grulab installed
with build isolation, torch upgraded since), it is compiled on first use with
``torch.utils.cpp_extension`` into ``$GRULAB_CACHE/native/<key>/`` (see
:func:`grulab.cache.default_cache_dir`), where the key hashes the sources,
torch's version, Python's and the machine type, so two checkouts with
different sources never share or rebuild each other's library. That build
says on stderr that it is compiling and why. Concurrent processes wait on an
``fcntl`` lock, which the OS releases when its holder dies, so a process
killed mid-build never leaves a lock that makes the next one wait; torch's
own lock file in that folder is removed by whoever holds ours. A build that
completed leaves a ``built`` marker; later processes import the library without
running ninja again.

``grulab kernels`` builds (or loads) it and says which one it is and which kernel runs.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

from grulab import cache

CSRC = Path(__file__).with_name("csrc")
# Compiler flags of every build (setup.py reads these too): no -march, no fast-math.
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]

_module: Optional[ModuleType] = None
_error: Optional[str] = None  # why no module could be had (remembered: no second try)
origin: Optional[str] = None  # "installed" or the JIT build folder


def sources() -> list[Path]:
    """The C++ sources compiled into the extension (headers and .inc files are included by them)."""
    return sorted(CSRC.glob("*.cpp"))


def source_key() -> str:
    """A hash of everything that determines the library: sources, torch, Python, machine."""
    import torch

    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h", ".inc"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|{CFLAGS}".encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    return cache.default_cache_dir() / "native" / source_key()


def _import_built(name: str, so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_build(reason: str) -> ModuleType:
    from torch.utils.cpp_extension import load

    key = source_key()
    name = f"grulab_native_{key}"
    folder = build_dir()
    so, done = folder / f"{name}.so", folder / "built"
    # A build that completed is imported as it is: ninja is not run again, so compiler
    # processes orphaned by a killed build (ninja puts them in their own process group)
    # that finish later cannot make a later load relink or recompile.
    if done.exists() and so.exists():
        return _import_built(name, so)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "grulab.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if we die
        if done.exists() and so.exists():  # built by the process we waited for
            return _import_built(name, so)
        # We hold the only lock, so a torch baton file left here is stale (its owner was killed).
        (folder / "lock").unlink(missing_ok=True)
        print(f"grulab: compiling the native GRU kernel into {folder} ({reason}); "
              f"this takes about a minute, once", file=sys.stderr, flush=True)
        module = load(name=name, sources=[str(p) for p in sources()], extra_cflags=CFLAGS,
                      extra_ldflags=LDFLAGS, build_directory=str(folder), verbose=False)
        done.write_text(key + "\n")  # only after the library was linked and imported
        return module


def load() -> Optional[ModuleType]:
    """The native extension (installed, else built on first use), or None with :data:`error` set."""
    global _module, _error, origin
    if _module is not None or _error is not None:
        return _module
    try:
        _module = _import_installed()
        origin = "installed"
        return _module
    except ImportError as exc:
        reason = ("it was not built when grulab was installed" if isinstance(exc, ModuleNotFoundError)
                  else f"the installed one does not load: {str(exc).splitlines()[0][:120]}")
    try:
        _module = _jit_build(reason)
        origin = str(build_dir())
    except Exception as exc:  # compiler missing, build error, ...
        last = (str(exc).strip().splitlines() or [""])[-1]
        _error = f"{type(exc).__name__}: {last}"
        warnings.warn(f"grulab: the C++ GRU kernel could not be built ({_error}); using the slower "
                      f"pure-PyTorch tier. Fix: install g++ and ninja, then reinstall grulab",
                      RuntimeWarning, stacklevel=3)
    return _module


def _import_installed() -> ModuleType:
    import torch  # noqa: F401  the library links against torch's (libc10.so is found through it)

    return importlib.import_module("grulab.kernels._native")


def error() -> Optional[str]:
    return _error

