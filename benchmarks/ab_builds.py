"""A/B of two grulab builds in one process: fwd+bwd of one layer, interleaved, medians.

Usage: PYTHONPATH=<dir holding grulab_old> python benchmarks/ab_builds.py [--reps N]

``grulab_old`` is an earlier checkout of src/grulab copied under another name (its torch
operators renamed to ``grulab_old::``), so both register side by side; each repetition
runs a torch.nn.GRU step first (the benchmark's cold state), then each build once.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import grulab.kernels.fused as new
import grulab_old.fused as old
from grulab.kernels import cpu_model

p = argparse.ArgumentParser()
p.add_argument("--reps", type=int, default=60)
p.add_argument("--shape", default="32,35,28,256", help="B,T,I,H")
p.add_argument("--kernel", default="native-avx512")
p.add_argument("--reset-before", action="store_true")
p.add_argument("--threads", type=int, default=0, help="torch's thread count (0: as it is)")
p.add_argument("--cpu-time", action="store_true",
               help="time the calling thread's CPU time (with --threads 1: robust to a busy machine)")
args = p.parse_args()
B, T, I, H = map(int, args.shape.split(","))
if args.threads:
    torch.set_num_threads(args.threads)
clock = time.thread_time if args.cpu_time else time.perf_counter
torch.manual_seed(0)
ref = torch.nn.GRU(I, H)
w = [q.detach().clone().requires_grad_() for q in ref.parameters()]
x, h0 = torch.randn(T, B, I), torch.zeros(B, H)
ra = not args.reset_before


def step(mod):
    def run():
        out, h = mod.gru_layer(x, h0, *w, ra, backend=args.kernel)
        out.sum().backward()
    return run


def cold():
    out, _ = ref(x)
    out.sum().backward()


runs = {"old": step(old), "new": step(new)}
for f in runs.values():
    f(); f()
times = {k: [] for k in runs}
for i in range(args.reps):
    order = list(runs.items()) if i % 2 == 0 else list(runs.items())[::-1]
    for name, f in order:
        cold()
        t0 = clock()
        f()
        times[name].append(clock() - t0)
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.kernel}, (B,T,I,H)=({B},{T},{I},{H}), "
      f"reset_after={ra}{' (thread CPU time)' if args.cpu_time else ''}: old {med['old']:.3f} ms, new {med['new']:.3f} ms, new/old {med['new'] / med['old']:.3f}")
