"""bf16 under torch.autocast: grulab.GRU against its own float32 and against torch.nn.GRU.

One layer, forward + backward of ``out.sum()`` into every weight, at the seed shape
(B, T, I, H) = (32, 35, 28, 256), the large one (64, 100, 256, 1024) and the large one with a batch
of 1 (1, 100, 256, 1024), all contenders in one process, interleaved (round-robin), medians:

* ``grulab fp32``: grulab.GRU(impl="fused") in float32 (its best native float32 kernel);
* ``grulab bf16 autocast``: the same module called under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  (the bf16 kernel where the CPU has bf16 units, else the float32 one: the fallback's ratio);
* ``torch.nn.GRU fp32`` and ``torch.nn.GRU bf16`` (its parameters and input in bfloat16: torch.nn.GRU
  is not on CPU autocast's list, so its bf16 is bf16 parameters);
* ``grulab bf16 params``: grulab.GRU with bfloat16 parameters and input;
* and, for the notes' ``reset_after=False`` cell with 1 to 4 rows, grulab fp32 against bf16 autocast
  (the bf16 loops split by rows from 2 rows);
* on a CPU with AMX, where ``grulab bf16 autocast`` runs ``native-amx``: ``vdpbf16ps kernel under
  autocast``, ``native-avx512bf16`` forced (the line printed per shape gives AMX / vdpbf16ps);
* ``fp32 kernel under autocast``: the module's float32 kernel forced under autocast, which is what
  a CPU without bf16 units runs (its ratio to ``grulab fp32`` is the fallback's cost).

Efficiency: the layer's FLOPs (18·T·B·H·(I + H) for forward + backward) over the best rate
torch.mm reaches in bf16 in this process (the bf16 GEMM floor), divided by the measured time.

Usage::

    python benchmarks/bench_bf16.py                   # printed
    python benchmarks/bench_bf16.py --write-results   # ... and written into benchmarks/results.md
    python benchmarks/bench_bf16.py --quick           # the seed shape only
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gru import (fmt_time, gemm_rate, interleaved, meta_lines, results_flags, results_target,  # noqa: E402
                       write_section)

import grulab  # noqa: E402
from grulab import kernels  # noqa: E402

SEED = (32, 35, 28, 256)  # (B, T, I, H)
LARGE = (64, 100, 256, 1024)
ONE = (1, 100, 256, 1024)  # a batch of 1: the bf16 tile on one row
# the notes' reset-before cell with few rows: bf16 split by rows from 2, against the float32 time loop
FEW_ROWS = [(1, 35, 28, 256), (2, 35, 28, 256), (4, 35, 28, 256), (4, 100, 256, 1024)]


def few_rows(shape, reps: int) -> dict:
    """grulab.GRU(reset_after=False) fwd+bwd in float32 and under autocast (torch has no such cell)."""
    B, T, I, H = shape
    torch.manual_seed(0)
    ours = grulab.GRU(I, H, impl="fused", reset_after=False)
    x = torch.randn(T, B, I)

    def step(autocast):
        def call():
            for p in ours.parameters():
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out, _ = ours(x)
            out.sum().backward()
        return call
    return interleaved({"grulab fp32": step(False), "grulab bf16 autocast": step(True)}, reps)


def contenders(shape) -> dict:
    B, T, I, H = shape
    torch.manual_seed(0)
    nn32 = torch.nn.GRU(I, H)
    ours = grulab.GRU(I, H, impl="fused")
    ours.load_state_dict(nn32.state_dict())
    nn16 = torch.nn.GRU(I, H).bfloat16()
    nn16.load_state_dict(nn32.state_dict())
    ours16 = grulab.GRU(I, H, impl="fused").bfloat16()
    ours16.load_state_dict(nn32.state_dict())
    x = torch.randn(T, B, I)
    x16 = x.bfloat16()

    def step(module, inp, autocast=False):
        def call():
            for p in module.parameters():
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out, _ = module(inp)
            out.float().sum().backward()
        return call

    float32 = kernels.first_native(kernels.Query())[0] or "fused-torch"

    def fallback():  # the float32 kernel under autocast: what a CPU without bf16 units runs
        for p in ours.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = ours._run(x, None, float32)
        out.sum().backward()

    more = {}
    if kernels.select_name("fused", "cpu", torch.float32, True, True) == "native-amx":
        def vdp():  # on an AMX CPU: the vdpbf16ps kernel, forced, against the AMX one that fused runs
            for p in ours.parameters():
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, _ = ours._run(x, None, "native-avx512bf16")
            out.sum().backward()
        more["vdpbf16ps kernel under autocast"] = vdp
    return {"grulab fp32": step(ours, x), "grulab bf16 autocast": step(ours, x, autocast=True), **more,
            "fp32 kernel under autocast": fallback,
            "torch.nn.GRU fp32": step(nn32, x), "torch.nn.GRU bf16": step(nn16, x16),
            "grulab bf16 params": step(ours16, x16)}


def table(rows: list, rate: float) -> str:
    names = list(rows[0][1])
    lines = ["| (B, T, I, H) | " + " | ".join(names) + " | bf16 autocast / grulab fp32 | / torch.nn.GRU fp32 | "
             "/ torch.nn.GRU bf16 | bf16 params / torch.nn.GRU bf16 | efficiency (bf16 autocast) | "
             "fallback / grulab fp32 |",
             "|---|" + "---|" * (len(names) + 6)]
    for shape, t in rows:
        B, T, I, H = shape
        floor = 18 * T * B * H * (I + H) / rate
        bf = t["grulab bf16 autocast"]
        lines.append(f"| {shape} | " + " | ".join(fmt_time(t[n]) for n in names)
                     + f" | {t['grulab fp32'] / bf:.2f}× | {t['torch.nn.GRU fp32'] / bf:.2f}× | "
                     f"{t['torch.nn.GRU bf16'] / bf:.2f}× | {t['torch.nn.GRU bf16'] / t['grulab bf16 params']:.2f}× | "
                     f"{floor / bf:.0%} | {t['grulab fp32'] / t['fp32 kernel under autocast']:.2f}× |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the seed shape only")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per contender (default: 40 seed, 6 large, 20 batch of 1)")
    results_flags(ap)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    target = results_target(args)
    load_before = os.getloadavg()
    rate = gemm_rate(torch.bfloat16, seconds=1.5)
    kernel = kernels.select_name("fused", "cpu", torch.float32, True, True)
    rows = []
    for shape in [SEED] + ([] if args.quick else [LARGE, ONE]):
        reps = args.reps or {SEED: 40, LARGE: 6, ONE: 20}[shape]
        rows.append((shape, interleaved(contenders(shape), reps)))  # 2 warm-up rounds, then medians
        t = rows[-1][1]
        print(f"{shape}: " + ", ".join(f"{n} {fmt_time(v)}" for n, v in t.items())
              + f"; bf16 autocast / grulab fp32 = {t['grulab fp32'] / t['grulab bf16 autocast']:.2f}×"
              + (f"; AMX / vdpbf16ps = {t['vdpbf16ps kernel under autocast'] / t['grulab bf16 autocast']:.2f}×"
                 if "vdpbf16ps kernel under autocast" in t else ""), flush=True)
    meta = meta_lines(argv, load_before[0], cpu=f"; bf16 units: {'yes' if kernels.has_bf16_units() else 'no'}; "
                                                 f"kernel under autocast: {kernel}") + [
        f"- best bf16 torch.mm rate of this process (the floor): {rate / 1e9:.0f} GFLOP/s; fwd+bwd of "
        "out.sum() into every weight, interleaved medians",
    ]
    text = "\n".join(meta) + "\n\n" + table(rows, rate)
    if not args.quick:
        lines = ["", "reset_after=False (the notes' cell) with few rows, fwd+bwd (torch.nn.GRU has no such cell):", "",
                 "| (B, T, I, H) | grulab fp32 | grulab bf16 autocast | bf16 autocast / grulab fp32 |", "|---|---|---|---|"]
        for shape in FEW_ROWS:
            t = few_rows(shape, args.reps or (20 if shape[3] < 1024 else 6))
            lines.append(f"| {shape} | {fmt_time(t['grulab fp32'])} | {fmt_time(t['grulab bf16 autocast'])} | "
                         f"{t['grulab fp32'] / t['grulab bf16 autocast']:.2f}× |")
            print(lines[-1], flush=True)
        text += "\n" + "\n".join(lines)
    print("\n" + text)
    if target is not None:
        write_section(target, f"## bf16 under autocast: {kernels.cpu_model()}\n\n" + text,
                      f"bench_bf16 {kernels.cpu_model()}" + (" quick" if args.quick else ""))
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
