"""Training tokens/s: 1 process × T threads against P processes × T/P threads (torchrun), side by side.

Each repetition runs the same `grulab train` (same global batch, same steps) once per layout, the
layouts interleaved, and reads the run's tokens/s from metrics.jsonl (training steps only, all
processes together: global tokens over rank 0's step time). Prints the medians and the ratio.

    python benchmarks/bench_ddp.py --reps 5 --cores 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(layout: tuple[int, int], args, out: Path) -> float:
    procs, threads = layout
    cmd = [sys.executable, "-m", "grulab", "train", "--nproc", str(procs), "--threads", str(threads),
           "--corpus", args.corpus, "--max-tokens", str(args.max_tokens), "--epochs", "1", "--max-minutes", "0",
           "--hidden", str(args.hidden), "--batch-size", str(args.batch_size), "--num-steps", str(args.num_steps),
           "--predict-length", "0", "--no-progress", "--overwrite", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows[-1]["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--layouts", default=None, help="PROCSxTHREADS,... (default: 1xC,2xC/2,1x1 for C cores)")
    p.add_argument("--corpus", default="austen")
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-steps", type=int, default=64)
    args = p.parse_args()
    layouts = ([tuple(int(v) for v in lay.split("x")) for lay in args.layouts.split(",")] if args.layouts
               else [(1, args.cores), (2, max(1, args.cores // 2)), (1, 1)])
    results: dict[tuple[int, int], list[float]] = {lay: [] for lay in layouts}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for lay in (layouts if rep % 2 == 0 else layouts[::-1]):  # interleaved, the order alternating
                results[lay].append(run(lay, args, Path(tmp) / "run"))
                print(f"rep {rep + 1}: {lay[0]} proc × {lay[1]} threads: {results[lay][-1]:,.0f} tok/s", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nCPU: {cpu}, {os.cpu_count()} logical CPUs; load average before/after: {load_before:.2f}/"
          f"{os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"hidden {args.hidden}, batch {args.batch_size}×{args.num_steps} (global), {args.max_tokens:,} tokens "
          f"of {args.corpus}, 1 epoch; {args.reps} interleaved repetitions")
    base = statistics.median(results[layouts[0]])
    for lay in layouts:
        vals = results[lay]
        med = statistics.median(vals)
        print(f"{lay[0]} process(es) × {lay[1]} thread(s): median {med:,.0f} tok/s "
              f"(range {min(vals):,.0f}–{max(vals):,.0f}), {med / base:.2f}× the first")


if __name__ == "__main__":
    main()
