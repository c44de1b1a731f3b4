"""Fixtures shared by several test files."""
from __future__ import annotations

import os
import platform

import pytest
import torch

from grulab import kernels
from grulab.kernels import native


def pytest_sessionstart(session):
    """Under CI (CI=true, as .ci/run sets) on an x86-64 machine the native kernels must be there:
    without them every native test would skip and the suite would pass with no native coverage."""
    if os.environ.get("CI", "").lower() in ("", "0", "false") or platform.machine() not in ("x86_64", "AMD64"):
        return
    if native.load() is None:
        pytest.exit(f"CI: the native GRU kernel is missing on this x86-64 machine ({native.error()}); "
                    f"its tests would all skip. Fix the build (g++, ninja, `make test`)", returncode=3)


@pytest.fixture(params=[k.name for k in kernels.KERNELS if k.impl == "fused"])
def tier(request) -> str:
    """Every fused kernel; a test taking it runs on each one this machine can run."""
    why = kernels.BY_NAME[request.param].why_not(kernels.Query())
    if why is not None:
        pytest.skip(f"{request.param}: {why}")
    return request.param


def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (small models: results then match across processes)."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """torch on two threads for the test (the thread governor chooses between 2 and 1)."""
    yield from _torch_threads(2)


def pytest_collection_modifyitems(config, items):
    """Cases that ask torch.nn.GRU's own kernel (``kernel="torch"``) for the notes' reset-before
    cell are not collected: that kernel computes only the reset-after cell, and grulab.GRU refuses
    ``impl="torch", reset_after=False`` in its constructor (tested on its own). Every skip left
    then names something this machine lacks (a CPU feature, Chromium, a CUDA device)."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (dropped if params.get("kernel") == "torch" and params.get("reset_after") is False else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
