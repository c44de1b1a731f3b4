"""``impl="auto"`` on the CPU: the kernel measured fastest for the call's shape, remembered per machine.

Which GRU kernel is fastest depends on the shape and the CPU: grulab's native
loops win by a wide margin at small and middle sizes, while at large hidden
sizes and batches torch.nn.GRU's per-step MKL calls can come close or win on
some CPUs. So, like ``torch.backends.cudnn.benchmark``, the first time a
``grulab.GRU(impl="auto")`` meets a call signature (sizes, layers, directions,
dtype, cell form, whether a backward follows, thread count) it times every
candidate that can run it, on random inputs of that shape, and keeps the
fastest:

* the first native kernel of :mod:`grulab.kernels` this CPU runs (AVX-512,
  AVX2 or generic loops); under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the bf16
  kernel as well, where the CPU has bf16 units (so auto is never slower than float32),
* ``fused-torch``, the same algorithm in torch operations,
* ``torch``, torch.nn.GRU's own kernels (``reset_after=True`` only).

Timing is interleaved (each round times every candidate once), the best of at
least three rounds (another process can only add time), forward plus
``torch.autograd.grad`` of the parameters when the call records a graph. Short
calls are warmed up twice (a first call pays for allocation, weight packing and
thread start-up, several times a later one), and a candidate more than 1.5×
slower than the best after two timed rounds stops being timed. For calls of a
second or more one warm-up call each is a fair sample: a candidate 1.2× slower
there is dropped, and if one is left it is chosen. The global random state is
restored afterwards, so measuring never changes a training run's dropout or
sampling. A kernel other than the static choice must win by 5% to be taken, so
near-ties do not flip between processes.

Choices are kept in memory and in ``$GRULAB_CACHE/autotune/<machine>.json``
(see :func:`grulab.cache.default_cache_dir`), where the machine key hashes the
CPU model, torch's version and the native sources: the next process on the
same machine does not measure again. ``grulab kernels`` lists them;
``GRULAB_AUTOTUNE=0`` turns measuring off (the static order of
:mod:`grulab.kernels` then decides), and ``GRULAB_KERNEL`` forcing a kernel
wins over both. Under ``torch.compile``, ``torch.export`` and ``torch.jit.trace``
the static choice is used (nothing is timed while tracing).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from grulab import cache, kernels
from grulab.kernels import native

ENV = "GRULAB_AUTOTUNE"
MARGIN = 1.05  # a candidate must beat the static choice by this factor to replace it
DROP = 1.5  # after the first round, candidates this much slower than the best stop being timed
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S = 3, 7, 1.0  # rounds stop at MAX_ROUNDS or once BUDGET_S is spent,
LONG_S = 3.0  # or after two rounds that took this long (large shapes: each call is seconds)
DROP_LONG = 1.2  # the warm-up's drop factor when a call takes LONG_S / 3 or more
MAX_ENTRIES = 512  # choices kept in the machine's file (the oldest go first)

_choices: dict[str, str] = {}  # signature -> kernel name, checked to run in this process
_from_file: Optional[dict[str, str]] = None  # the machine file's choices, read once (None: not yet)
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def signature(module, input: torch.Tensor, hx: Optional[torch.Tensor], grad: bool,
              autocast: Optional[bool] = None) -> str:
    """The call signature a choice is kept for (input is (T, B, I)); ``autocast``: under bf16 autocast
    (None: whether this call is, kernels.bf16_autocast)."""
    if autocast is None:
        autocast = kernels.bf16_autocast(input.device.type)
    T, B, I = input.shape
    return (f"T={T} B={B} I={I} H={module.hidden_size} layers={module.num_layers} "
            f"dirs={2 if module.bidirectional else 1} bias={module.bias} "
            f"dtype={str(input.dtype).replace('torch.', '')} reset_after={module.reset_after} "
            f"h0={hx is not None} {'fwd+bwd' if grad else 'fwd'} "
            f"dropout={module.dropout > 0 and module.training} threads={torch.get_num_threads()}"
            + (" autocast=bf16" if autocast else ""))


def candidates(query: kernels.Query) -> list[str]:
    """Kernel names that can run ``query``, the static choice first."""
    names = []
    # Under bf16 autocast every bf16 kernel (AMX tiles, vdpbf16ps) and the float32 one (auto is never
    # slower than float32).
    float32 = kernels.Query(query.device, query.dtype, query.reset_after)
    bf16 = [k.name for k in kernels.KERNELS if k.bf16] if query.autocast else []
    for name in (kernels.first_native(query)[0], *bf16, kernels.first_native(float32)[0], "fused-torch", "torch"):
        if name is not None and name not in names and kernels.BY_NAME[name].why_not(query) is None:
            names.append(name)
    static = kernels.select_name("auto", query.device, query.dtype, query.reset_after, query.autocast)
    return sorted(names, key=lambda n: n != static)


def choose(module, input: torch.Tensor, hx: Optional[torch.Tensor],
           run: Callable[[torch.Tensor, Optional[torch.Tensor], str], tuple]) -> str:
    """The kernel for this call of ``module`` (a grulab.GRU with impl="auto", CPU input (T, B, I)).

    ``run(x, hx, kernel)`` is the module's forward with a fixed kernel."""
    mixed = kernels.bf16_autocast(input.device.type)
    if kernels.forced() is not None or not enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return kernels.select_name("auto", input.device.type, input.dtype, module.reset_after, mixed)
    grad = torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in module.parameters()))
    key = signature(module, input, hx, grad, mixed)
    name = _choices.get(key)
    if name is not None:
        return name
    query = kernels.Query(input.device.type, input.dtype, module.reset_after, mixed)
    with _lock:
        name = _file_choices().get(key)
    if name is not None and name in kernels.BY_NAME and kernels.BY_NAME[name].why_not(query) is None:
        _choices[key] = name  # checked once: a forward's lookup is one dict get
        return name
    names = candidates(query)  # the static choice first
    if len(names) < 2:
        return names[0]
    times = _measure(module, input, hx, grad, names, run)
    best = min(times, key=times.get)
    if best != names[0] and names[0] in times and times[best] * MARGIN > times[names[0]]:
        best = names[0]
    with _lock:
        _choices[key] = best
        _save(key, best, times)
    return best


def _measure(module, input, hx, grad, names, run) -> dict[str, float]:
    """Best seconds per call of each candidate on random inputs of this shape, interleaved."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad() if grad else torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(input.shape, generator=gen, dtype=input.dtype).requires_grad_(input.requires_grad and grad)
        h = None if hx is None else torch.zeros(hx.shape, dtype=hx.dtype)
        wrt = ([x] if x.requires_grad else []) + ([p for p in module.parameters() if p.requires_grad] if grad else [])

        def call(name: str) -> float:
            t0 = time.perf_counter()
            out, h_n = run(x, h, name)
            if wrt:
                torch.autograd.grad(out.sum() + h_n.sum(), wrt)
            return time.perf_counter() - t0

        warm = {name: call(name) for name in names}  # first calls: allocation, packing, thread start-up
        long = min(warm.values()) > LONG_S / 3  # a second or more a call: one-time costs are noise
        if long:
            alive = [n for n in names if warm[n] <= DROP_LONG * min(warm.values())]
            if len(alive) == 1:
                return {alive[0]: warm[alive[0]]}
        else:  # short calls: a first call can cost several times the next ones, so warm up again
            alive = list(names)
            for name in names:
                call(name)
        rounds: dict[str, list[float]] = {name: [] for name in alive}
        start = time.perf_counter()
        for r in range(MAX_ROUNDS):
            for name in alive:
                rounds[name].append(call(name))
            if r == 1:  # after two timed rounds, stop timing the clearly slower ones
                best = min(min(rounds[n]) for n in alive)
                alive = [n for n in alive if min(rounds[n]) <= DROP * best]
            spent = time.perf_counter() - start
            if r + 1 >= MIN_ROUNDS and spent > BUDGET_S or r + 1 >= 2 and spent > LONG_S:
                break
    return {name: min(ts) for name, ts in rounds.items()}


# -- the machine's file ---------------------------------------------------------------------


def machine_key() -> str:
    """CPU model, torch's version and the native sources: what a choice depends on besides the shape."""
    return hashlib.sha256(f"{kernels.cpu_model()}|{torch.__version__}|{native.source_key()}".encode()).hexdigest()[:16]


def path() -> Path:
    return cache.default_cache_dir() / "autotune" / f"{machine_key()}.json"


def _read(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and isinstance(data.get("choices"), dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again, and rewrite it


def _file_choices() -> dict[str, str]:
    """The machine file's choices (signature -> kernel name), read on first use."""
    global _from_file
    if _from_file is None:
        entries = _read(path()).get("choices", {})
        _from_file = {key: e["kernel"] for key, e in entries.items()
                      if isinstance(e, dict) and isinstance(e.get("kernel"), str)}
    return _from_file


def _save(key: str, kernel: str, times: dict[str, float]) -> None:
    """Merge one choice into the machine's file (under a lock; an unwritable cache is not an error)."""
    p = path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read(p) or {"cpu": kernels.cpu_model(), "torch": torch.__version__, "choices": {}}
            data["choices"][key] = {"kernel": kernel, "ms": {n: round(t * 1e3, 4) for n, t in times.items()},
                                    "when": _dt.datetime.now().isoformat(timespec="seconds")}
            while len(data["choices"]) > MAX_ENTRIES:
                data["choices"].pop(next(iter(data["choices"])))
            tmp = p.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            os.replace(tmp, p)
    except OSError:
        pass


def recorded() -> dict[str, dict]:
    """This machine's recorded choices: signature -> {"kernel", "ms": {kernel: best ms}, "when"}."""
    return _read(path()).get("choices", {})


def forget() -> None:
    """Drop this process's choices and delete the machine's file (the next calls measure again)."""
    global _from_file
    with _lock:
        _choices.clear()
        _from_file = None
        try:
            path().unlink()
        except OSError:
            pass
