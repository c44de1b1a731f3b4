"""Which GRU kernel runs, and why: the one place that decides.

Every kernel says what it supports and, if it cannot run a call, every reason
why not (as xformers' ops do). :func:`select` walks the candidates of an ``impl``
in order of preference and returns the first that can run; :func:`explain`
returns the whole table. :mod:`grulab.kernels.plan` adds what autotune measured
and what the native loops decide for a shape; ``grulab kernels`` prints it.

The package: this registry; :mod:`~grulab.kernels.fused` (the torch operator and
its two tiers), :mod:`~grulab.kernels.native` (building and loading ``csrc/``),
:mod:`~grulab.kernels.autotune` (``impl="auto"``'s measurements),
:mod:`~grulab.kernels.threads` (the thread governor), :mod:`~grulab.kernels.plan`.

========================  ======================================================
kernel                    what it is
========================  ======================================================
``native-amx``            native-avx512bf16's loops with the per-step products on AMX
                          tiles (AMX-BF16, where the OS grants them)
``native-avx512bf16``     the AVX-512 loops with bf16 products (AVX512-BF16), for
                          torch.autocast("cpu", torch.bfloat16) and bfloat16 parameters
``native-avx512``         csrc/ loops compiled for AVX-512 (CPU, float32/64)
``native-avx2``           csrc/ loops compiled for AVX2 + FMA (CPU, float32/64)
``native-generic``        csrc/ loops for any x86-64 CPU (CPU, float32/64)
``fused-torch``           the fused algorithm in torch ops (any device and dtype)
``torch``                 torch.nn.GRU's own kernels, cuDNN on CUDA (reset-after only)
``reference``             grulab.reference, the notes' equations line by line
========================  ======================================================

The AVX2 and AVX-512 builds run float32 on weights packed once per call into register
panels, both cell forms (reset-after, and the notes' reset-before where the batch has 8 rows
or more and the weights fit in one core's L2); ``plan()`` says what a shape runs.

Mixed precision. Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (and for bfloat16
parameters) ``native-amx`` (AMX tiles, where the CPU has AMX-BF16 and the OS grants the tiles)
or ``native-avx512bf16`` (vdpbf16ps) runs the products in bf16 with float32 sums, and keeps the
hidden state, the gate arithmetic, the saved gates and the results in float32 (bfloat16
parameters get bfloat16 results and gradients, computed the same way). Where the CPU has no
bf16 units the float32 kernels run the autocast call in float32: its ``why_not`` says so.

``impl="fused"`` means the first of the native kernels this CPU runs, else
``fused-torch``; ``impl="auto"`` means ``torch`` (cuDNN) on CUDA for the
reset-after cell and, on the CPU, the candidate measured fastest for the
call's shape (:mod:`grulab.kernels.autotune`; this order is its starting point and the
choice when measuring is off, while compiling, and for single steps).

``GRULAB_KERNEL=<kernel>`` forces the kernel of every fused call (tests use it
to run each path the machine can run); forcing one that cannot run raises a
RuntimeError that says why.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from grulab.kernels import native

ENV = "GRULAB_KERNEL"
_FLOAT_NATIVE = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Query:
    """What a call needs: the device type ("cpu", "cuda", ...), the dtype and the cell form."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    reset_after: bool = True
    autocast: bool = False  # under torch.autocast("cpu", dtype=torch.bfloat16): bf16 products wanted


@dataclass(frozen=True)
class Kernel:
    name: str
    impl: str  # the grulab.GRU ``impl`` family it belongs to: "fused", "torch" or "reference"
    doc: str
    why_not: Callable[[Query], Optional[str]]  # None if it can run the query, else the reason
    bf16: bool = False  # bf16 products: float32 calls run it only under torch.autocast (Query.autocast)


def _float_dtypes(q: Query) -> Optional[str]:
    if q.dtype not in _FLOAT_NATIVE:
        return f"float32 and float64 only (got {str(q.dtype).replace('torch.', '')})"
    return None


def _bf16_dtypes(q: Query) -> Optional[str]:
    if q.dtype == torch.float32 and not q.autocast:
        return "runs under torch.autocast('cpu', dtype=torch.bfloat16) or on bfloat16 parameters"
    if q.dtype not in (torch.float32, torch.bfloat16):
        return f"float32 under autocast and bfloat16 only (got {str(q.dtype).replace('torch.', '')})"
    return None


def _native(isa: str, dtypes: Callable[[Query], Optional[str]] = _float_dtypes,
            lacks: Optional[str | Callable[[Any], str]] = None,
            verify: Optional[Callable[[Any], Optional[str]]] = None) -> Callable[[Query], Optional[str]]:
    """why_not of the native table ``isa``: ``dtypes`` says which calls it takes, ``lacks`` what a CPU
    without ``isa`` is told (default: "this CPU lacks ISA"; a function of the native module: its answer),
    ``verify`` (a function of the native module, cached) why a CPU that has ``isa`` still may not run it."""
    def why_not(q: Query) -> Optional[str]:  # every reason, not just the first
        reasons = []
        if q.device != "cpu":
            reasons.append(f"CPU tensors only (got {q.device})")
        if (dtype_reason := dtypes(q)) is not None:
            reasons.append(dtype_reason)
        mod = native.load()
        if mod is None:
            reasons.append(f"native extension unavailable ({native.error()})")
        elif not mod.cpu_supports(isa):
            reasons.append((lacks(mod) if callable(lacks) else lacks) or f"this CPU lacks {isa.upper()}")
        elif verify is not None and (failed := verify(mod)) is not None:
            reasons.append(failed)
        return "; ".join(reasons) or None

    return why_not


def has_bf16_units() -> bool:
    """Whether this CPU runs the bf16 kernel (AVX512-BF16; CPUs with AMX have it too)."""
    mod = native.load()
    return mod is not None and bool(mod.cpu_supports("avx512bf16"))


@functools.cache
def tiles_disagree(mod: Any, isa: str = "amx", yardstick: str = "avx512bf16") -> Optional[str]:
    """Why the native table ``isa`` is not trusted on this CPU, or None: once per process, before
    its first call, two small layers (forward and backward, both cell forms, 16 batch rows and 4
    past them, column tails) run on it and on ``yardstick``'s loops, which compute the same bf16
    products with their float32 sums in another order. Every result must agree within 3e-3 of its
    largest entry (the tests' bound). The AMX loops are tested on tiles emulated in software on
    every CPU with AVX512-BF16; this check is what stands between a user and real tiles that
    compute otherwise (a few ms, where the CPU has AMX)."""
    T, B, I, H = 3, 20, 37, 80  # (T, B, I, H): rows past a 16-row tile, I and H off the tiles' 32
    g = torch.Generator().manual_seed(0)
    x, go = torch.randn(T, B, I, generator=g), torch.randn(T, B, H, generator=g)  # (T, B, I), (T, B, H)
    h0 = torch.randn(B, H, generator=g)
    w_ih, w_hh = torch.randn(3 * H, I, generator=g) / I ** 0.5, torch.randn(3 * H, H, generator=g) / H ** 0.5
    b_ih, b_hh = torch.randn(3 * H, generator=g), torch.randn(3 * H, generator=g)
    names = ("output", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh")
    for reset_after in (True, False):
        results = []
        for table in (isa, yardstick):
            # as the fused backends run them (autocast off: the tables make their own bf16 products),
            # whatever context asked first
            with torch.autocast("cpu", enabled=False):
                out, _, saved = mod.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True, table, 2)
                grads = mod.backward(go, None, x, h0, w_ih, w_hh, out, saved, reset_after,
                                     True, True, True, True, table, 2, 0)
            results.append((out, *grads))
        for name, got, want in zip(names, *results):
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            if not err <= 3e-3:  # NaN fails too
                return (f"its loops disagree with {yardstick}'s on a test layer ({name} off by {err:.1e} of its "
                        f"largest entry at (T, B, I, H) = {(T, B, I, H)}, reset_after={reset_after}); "
                        f"please report this CPU (grulab kernels prints it)")
    return None


def _fused_torch(q: Query) -> Optional[str]:
    return None if q.dtype.is_floating_point else f"floating dtypes only (got {q.dtype})"


def _torch(q: Query) -> Optional[str]:
    return None if q.reset_after else "computes only the reset-after cell"


KERNELS: tuple[Kernel, ...] = (
    Kernel("native-amx", "fused", "AVX-512 loops with bf16 products on AMX tiles (tdpbf16ps), float32 state",
           _native("amx", _bf16_dtypes, lambda mod: mod.amx_unavailable(), tiles_disagree), bf16=True),
    Kernel("native-avx512bf16", "fused", "AVX-512 loops with bf16 products (vdpbf16ps), float32 state",
           _native("avx512bf16", _bf16_dtypes, "this CPU has no bf16 units (AVX512-BF16)"), bf16=True),
    Kernel("native-avx512", "fused", "C++ loops compiled for AVX-512", _native("avx512")),
    Kernel("native-avx2", "fused", "C++ loops for AVX2+FMA, packed micro-kernels", _native("avx2")),
    Kernel("native-generic", "fused", "C++ loops for any x86-64 CPU", _native("generic")),
    Kernel("fused-torch", "fused", "the fused algorithm in torch ops", _fused_torch),
    Kernel("torch", "torch", "torch.nn.GRU's kernels (cuDNN on CUDA)", _torch),
    Kernel("reference", "reference", "the notes' equations, autograd", lambda q: None),
)
BY_NAME = {k.name: k for k in KERNELS}


def first_native(query: Query) -> tuple[Optional[str], Optional[str]]:
    """(the first native kernel that can run ``query``, None) in this module's order, else (None, why not)."""
    why = None
    for k in KERNELS:
        if k.name.startswith("native-"):
            why = k.why_not(query)
            if why is None:
                return k.name, None
    return None, why


def forced() -> Optional[str]:
    """The kernel forced by ``GRULAB_KERNEL``, if any (checked against the known names)."""
    name = os.environ.get(ENV, "").strip()
    if not name:
        return None
    if name not in BY_NAME or BY_NAME[name].impl != "fused":
        choices = ", ".join(k.name for k in KERNELS if k.impl == "fused")
        raise ValueError(f"{ENV}={name!r} is not a fused kernel; expected one of {choices}")
    return name


def _candidates(impl: str, q: Query) -> list[Kernel]:
    if impl == "auto":
        impl = "torch" if q.device == "cuda" and q.reset_after else "fused"
    return [k for k in KERNELS if k.impl == impl]


def explain(impl: str = "auto", query: Query = Query()) -> list[tuple[Kernel, Optional[str], bool]]:
    """Every candidate of ``impl`` for ``query``: (kernel, why it cannot run or None, chosen)."""
    chosen = select(impl, query)
    return [(k, k.why_not(query), k.name == chosen.name) for k in _candidates(impl, query)]


def _select(impl: str, device: str, dtype: torch.dtype, reset_after: bool, force: Optional[str],
            autocast: bool = False) -> str:
    q = Query(device, dtype, reset_after, autocast)
    cands = _candidates(impl, q)
    if force is not None and cands and cands[0].impl == "fused":
        reason = BY_NAME[force].why_not(q)
        if reason is not None:
            raise RuntimeError(f"{ENV}={force} cannot run here: {reason}; "
                               f"unset {ENV} or pick another kernel (grulab kernels lists them)")
        return force
    for k in cands:
        if k.why_not(q) is None:
            return k.name
    raise RuntimeError(f"no {impl} GRU kernel can run on {device} {dtype}")


_cache: dict = {}


@torch.compiler.assume_constant_result
def select_name(impl: str, device: str, dtype: torch.dtype, reset_after: bool, autocast: bool = False) -> str:
    """The name of the kernel that runs ``impl`` for this call (cached per signature); ``autocast``:
    the call runs under torch.autocast("cpu", dtype=torch.bfloat16) (:func:`bf16_autocast`)."""
    force = forced()
    key = (impl, device, dtype, reset_after, force, autocast)
    name = _cache.get(key)
    if name is None:
        name = _cache[key] = _select(impl, device, dtype, reset_after, force, autocast)
    return name


def bf16_autocast(device: str = "cpu") -> bool:
    """Whether calls on ``device`` run under torch.autocast with dtype bfloat16 (the CPU only)."""
    return device == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def select(impl: str = "auto", query: Query = Query()) -> Kernel:
    """The kernel that runs ``impl`` ("auto", "fused", "torch", "reference") for ``query``."""
    return BY_NAME[select_name(impl, query.device, query.dtype, query.reset_after, query.autocast)]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
