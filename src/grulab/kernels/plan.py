"""Everything decided for one GRU call, explained: ``grulab kernels [--shape T,B,I,H] [--train]``.

    from grulab.kernels.plan import plan
    plan(35, 32, 28, 256, train=True)   # -> dict: the kernel, why the others were not picked,
                                        #    the ISA, packed or not, the split, chunking, threads

Three places decide, and this module asks each of them rather than repeating their rules:
:mod:`grulab.kernels` (which kernels can run, every reason why not, the static order),
:mod:`grulab.kernels.autotune` (what ``impl="auto"`` measured on this machine for the call's
signature) and the native loops (``forward_plan`` / ``backward_plan`` in ``csrc/native.h``,
through the extension's ``plan()``: packed weights or a GEMM per step, rows or units split,
chunk steps, the dX / dW_ih tiles, threads). The thread count is the governor's for that shape
where it has timed one (:mod:`grulab.kernels.threads`), else torch's.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

import torch

from grulab import kernels
from grulab.kernels import autotune, fused, native

__all__ = ["plan", "format_plan", "report"]


def _auto_choice(T: int, B: int, I: int, H: int, dtype: torch.dtype, reset_after: bool,
                 train: bool, autocast: bool = False) -> tuple[Optional[str], str]:
    """(kernel, why) for impl="auto" on the CPU: the measured choice for a one-layer
    grulab.GRU of this shape, else the static order's (and why)."""
    static = kernels.select_name("auto", "cpu", dtype, reset_after, autocast)
    if kernels.forced() is not None:
        return static, f"forced by {kernels.ENV}"
    if not autotune.enabled():
        return static, f"measuring is off ({autotune.ENV}=0): the static order decides"
    module = SimpleNamespace(hidden_size=H, num_layers=1, bidirectional=False, bias=True, reset_after=reset_after,
                             dropout=0.0, training=train)
    key = autotune.signature(module, torch.empty(T, B, I, dtype=dtype, device="meta"), None, train, autocast)
    entry = autotune.recorded().get(key)
    if entry is None:
        return static, "not measured yet on this machine (the first call measures); the static order's pick"
    times = ", ".join(f"{n} {ms:.3g} ms" for n, ms in sorted(entry.get("ms", {}).items(), key=lambda kv: kv[1]))
    return entry.get("kernel"), f"measured fastest on this machine ({times})"


def _governor_threads(isa: str, T: int, B: int, I: int, H: int, dtype, reset_after: bool) -> tuple[int, str]:
    n = fused._NativeTier.threads_in_use(isa, (T, B, I), H, dtype, reset_after)
    if n is not None:
        return n, "the thread governor's count for this shape"
    return torch.get_num_threads(), "torch's thread count (the governor has not timed this shape)"


def plan(T: int, B: int, I: int, H: int, *, train: bool = False, dtype: torch.dtype = torch.float32,
         reset_after: bool = True, impl: str = "auto", autocast: bool = False) -> dict:
    """What a call of a one-layer grulab.GRU on CPU input (T, B, I) with hidden size H runs, and why;
    ``autocast``: the call under torch.autocast("cpu", dtype=torch.bfloat16)."""
    query = kernels.Query("cpu", dtype, reset_after, autocast)
    result: dict = {"shape": {"T": T, "B": B, "I": I, "H": H}, "train": train,
                    "dtype": str(dtype).replace("torch.", ""), "reset_after": reset_after, "impl": impl,
                    "autocast": autocast, "cpu": kernels.cpu_model()}
    # impl="auto" on the CPU measures the first native kernel (under autocast every bf16 one and the
    # float32 one: autotune.candidates), fused-torch and torch.nn.GRU's own
    shown = [k for k in kernels.KERNELS if k.impl == "fused" or (impl == "auto" and k.impl == "torch")]
    candidates = [{"kernel": k.name, "runs": k.why_not(query) is None, "why_not": k.why_not(query), "doc": k.doc}
                  for k in shown]
    if impl == "auto":
        chosen, why = _auto_choice(T, B, I, H, dtype, reset_after, train, autocast)
    else:
        chosen, why = kernels.select_name(impl, "cpu", dtype, reset_after, autocast), f"impl={impl!r}"
    for c in candidates:
        c["chosen"] = c["kernel"] == chosen
    result.update(kernel=chosen, why=why, candidates=candidates)
    if not (B and I and H):
        result["native"] = None
        result["note"] = "a zero size runs on fused-torch (torch's own ops have the empty-tensor semantics)"
    elif chosen is not None and chosen.startswith("native-"):
        isa = chosen[len("native-"):]
        n, n_why = _governor_threads(isa, T, B, I, H, dtype, reset_after)
        result["native"] = {"isa": isa, "threads_asked": n, "threads_why": n_why,
                            **native.load().plan(isa, dtype in (torch.float32, torch.bfloat16), T, B, I, H,
                                                 reset_after, n)}
    else:
        result["native"] = None
    return result


def format_plan(p: dict) -> str:
    """The plan as the lines ``grulab kernels --shape`` prints."""
    s = p["shape"]
    lines = [f"call: grulab.GRU(impl={p['impl']!r}) on (T, B, I) = ({s['T']}, {s['B']}, {s['I']}), H = {s['H']}, "
             f"{p['dtype']}, reset_after={p['reset_after']}, {'forward + backward' if p['train'] else 'forward'}"
             + (", under torch.autocast('cpu', dtype=torch.bfloat16)" if p.get("autocast") else ""),
             f"CPU: {p['cpu']}", f"kernel: {p['kernel']}  ({p['why']})"]
    for c in p["candidates"]:
        mark = "->" if c["chosen"] else "  "
        lines.append(f"  {mark} {c['kernel']:<15} {'can run' if c['runs'] else 'no: ' + c['why_not']}")
    n = p.get("native")
    if n:
        f, b = n["forward"], n["backward"]
        lines.append(f"native loops ({n['isa'].upper()}), asked for {n['threads_asked']} thread(s): {n['threads_why']}")
        bf16 = " (bf16 products, float32 sums)" if f.get("bf16") else ""
        lines.append(f"  forward:  {'packed weights, split by ' + f['split'] if f['packed'] else 'a GEMM per step'}"
                     f"{bf16}, {f['threads']} thread(s)")
        if p["train"]:
            lines.append(f"  backward: {'packed W_hh' if b['packed'] else 'a GEMM per step'}, split by {b['split']}, "
                         f"{b['threads']} thread(s), chunks of {b['chunk_steps']} steps, "
                         + ("bf16 per-step products, dX and weight GEMMs in bf16 (oneDNN), " if b.get("bf16") else
                            f"dX by {'our tile' if b['dx_tile'] else 'MKL'}, dW_ih by {'our narrow tile' if b['dw_ih_narrow_tile'] else 'MKL'}, ")
                         + f"bias sums {'by row blocks' if b['bias_sums_by_row_blocks'] else 'over whole steps'}")
        l2 = n["l2_bytes"]
        lines.append(f"  L2 per core: {l2 // 1024 if l2 else '?'} KiB; the weights (3H(H+I) floats) "
                     f"{'fit' if n['weights_fit_l2'] else 'do not fit'}; a register tile holds {n['register_rows']} rows")
    elif p.get("note"):
        lines.append(p["note"])
    return "\n".join(lines)


def report(query: kernels.Query = kernels.Query()) -> str:
    """A plain-text table: the CPU, where the native extension came from, each kernel with every
    reason it cannot run, and what autotune has measured on this machine."""
    lines = [f"CPU: {kernels.cpu_model()}"]
    mod = native.load()
    lines.append(f"native extension: {native.origin} " if mod is not None
                 else f"native extension: unavailable ({native.error()})")
    lines.append(f"query: device={query.device} dtype={str(query.dtype).replace('torch.', '')} "
                 f"reset_after={query.reset_after}"
                 + (f"  ({kernels.ENV}={os.environ[kernels.ENV]})" if os.environ.get(kernels.ENV) else ""))
    for impl in ("auto", "fused"):
        lines.append(f"impl={impl!r}:")
        for k, why, chosen in kernels.explain(impl, query):
            mark = "->" if chosen else "  "
            lines.append(f"  {mark} {k.name:<15} {'runs' if why is None else 'no: ' + why}   ({k.doc})")
    lines += _measured_lines()
    return "\n".join(lines)


def _measured_lines() -> list[str]:
    """grulab.kernels.autotune's choices recorded for this machine, for :func:`report`."""
    if not autotune.enabled():
        return [f"impl='auto' on the CPU: measuring is off ({autotune.ENV}=0), the order above decides"]
    choices = autotune.recorded()
    lines = [f"impl='auto' on the CPU picks, per call signature, the kernel measured fastest; "
             f"{len(choices)} recorded for this machine in {autotune.path()}"
             + (":" if choices else " (none yet: the first call of each signature measures)")]
    for key, entry in list(choices.items())[-20:]:
        times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(entry.get("ms", {}).items(), key=lambda kv: kv[1]))
        lines.append(f"  {key}: -> {entry.get('kernel')}   ({times})")
    if len(choices) > 20:
        lines.append(f"  ... and {len(choices) - 20} earlier ones")
    return lines
