"""What bf16 matrix products could give a GRU on this CPU: torch.matmul in bf16 (oneDNN: AMX or
AVX512-BF16 where the CPU has them) against float32, at the GEMMs of a GRU step and of the input
projection, interleaved in one process, medians. The ceiling for a bf16 GRU kernel (issue
"bf16 on the CPU"), measured before writing one.

    python benchmarks/bench_bf16_gemm.py [--reps 50]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from grulab.kernels import cpu_model

SHAPES = {  # (M, K, N): C (M, N) = A (M, K) @ B (K, N)
    "seed step h W_hh^T (32, 256, 768)": (32, 256, 768),
    "large step (64, 1024, 3072)": (64, 1024, 3072),
    "seed input projection (1120, 28, 768)": (35 * 32, 28, 768),
    "input projection (3500, 256, 768)": (3500, 256, 768),
    "large input projection (6400, 256, 3072)": (6400, 256, 3072),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    units = [u for u in ("amx_bf16", "avx512_bf16") if u in flags]
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 units: {', '.join(units) or 'none'}")
    print("| GEMM (M, K, N) | float32 | bf16 | bf16 / float32 speed |")
    print("|---|---|---|---|")
    for name, (M, K, N) in SHAPES.items():
        a, b = torch.randn(M, K), torch.randn(K, N)
        ah, bh = a.bfloat16(), b.bfloat16()
        runs = {"f32": lambda: torch.mm(a, b), "bf16": lambda: torch.mm(ah, bh)}
        for f in runs.values():
            f(); f()
        times = {k: [] for k in runs}
        for _ in range(args.reps):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        gf = {k: 2 * M * K * N / t / 1e9 for k, t in med.items()}
        print(f"| {name} | {gf['f32']:.0f} GFLOP/s | {gf['bf16']:.0f} GFLOP/s | {med['f32'] / med['bf16']:.2f}× |")


if __name__ == "__main__":
    main()
