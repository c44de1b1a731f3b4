"""The first-use build of the native kernel: keyed on the sources, never blocked by a dead process.

The normal install builds grulab.kernels._native (setup.py); these tests take the
fallback path on purpose, with copies of the package that have no built
library, in real subprocesses sharing one GRULAB_CACHE.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import grulab

PKG = Path(grulab.__file__).parent


def checkout(root: Path, comment: str = "") -> Path:
    """A copy of the package without any built library, as a second checkout would be."""
    dst = root / "src" / "grulab"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if comment:
        with open(dst / "kernels" / "csrc" / "kernels.h", "a") as f:
            f.write(f"\n// {comment}\n")
    return root / "src"


LOAD = ("import grulab, grulab.kernels.native as n, sys\n"
        "assert grulab.__file__.startswith(sys.argv[1]), grulab.__file__\n"
        "m = n.load(); assert m is not None, n.error()\n"
        "print(n.origin); print(m.cpu_supports('generic'))\n")


def run(src: Path, cache: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(src), GRULAB_CACHE=str(cache))
    return subprocess.run([sys.executable, "-c", LOAD, str(src)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=src.parent)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_first_use_build_survives_kill_and_is_keyed_on_the_source(tmp_path):
    cache = tmp_path / "cache"
    a = checkout(tmp_path / "a")

    # 1. A process killed in the middle of the build leaves nothing that makes the next one wait.
    env = dict(os.environ, PYTHONPATH=str(a), GRULAB_CACHE=str(cache))
    victim = subprocess.Popen([sys.executable, "-c", LOAD, str(a)], env=env, cwd=a.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob("native/*/build.ninja")):
        time.sleep(0.2)
    time.sleep(2)  # the compiler is running now
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    (folder,) = cache.glob("native/*")
    (folder / "lock").touch()  # as torch's own lock file would be left by a killed build

    first = run(a, cache, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "grulab: compiling the native GRU kernel" in first.stderr  # said on stderr, with the reason
    assert "not built when grulab was installed" in first.stderr
    assert first.stdout.split() == [str(folder), "True"]
    so = next(folder.glob("*.so"))
    mtime = so.stat().st_mtime_ns

    # 2. The same sources again: the library is reused, nothing is compiled, nothing waits.
    (folder / "lock").touch()
    t = time.time()
    again = run(a, cache, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr
    assert again.stdout.split()[0] == str(folder)
    assert time.time() - t < 120
    # Not even relinked, although the killed build's compilers (ninja spawns them in their
    # own process group, so the kill above did not reach them) may have written objects since.
    assert so.stat().st_mtime_ns == mtime

    # 3. A second checkout whose sources differ gets its own folder: neither rebuilds the other's.
    b = checkout(tmp_path / "b", comment="a change in the second checkout")
    code = "import grulab.kernels.native as n; print(n.build_dir())"
    env_b = dict(os.environ, PYTHONPATH=str(b), GRULAB_CACHE=str(cache))
    folder_b = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env_b, cwd=b.parent, check=True).stdout.strip()
    assert Path(folder_b).parent == folder.parent and Path(folder_b) != folder
    third = run(a, cache, timeout=300)  # checkout a after b has been looked at: still no build
    assert third.returncode == 0 and "compiling" not in third.stderr
    assert so.stat().st_mtime_ns == mtime


BROKEN = ("import sys, pytest, grulab.kernels.native as n\n"
          "def missing(): raise ModuleNotFoundError('grulab.kernels._native')\n"
          "def no_compiler(reason): raise RuntimeError('no C++ compiler')\n"
          "n._import_installed, n._jit_build = missing, no_compiler\n"
          "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[1]]))\n")


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_fails_without_the_native_kernel(ci, tmp_path):
    """Under CI=true on x86-64 a missing native build ends the suite with an error instead of
    letting every native test skip; without CI it stays a warning and the tests run."""
    if os.uname().machine != "x86_64":
        pytest.skip("the native kernel is required on x86-64 only")
    test = Path(__file__).with_name("test_gru.py")
    env = {**os.environ, "CI": ci}
    proc = subprocess.run([sys.executable, "-c", BROKEN, f"{test}::test_state_dict_interchange_both_ways"],
                          capture_output=True, text=True, env=env, timeout=300)
    if ci:
        assert proc.returncode == 3, proc.stdout[-2000:]
        assert "the native GRU kernel is missing" in proc.stdout + proc.stderr
    else:
        assert proc.returncode in (0, 5), proc.stdout[-2000:]  # ran (or found nothing): not stopped
