"""grulab.GRU (impl="auto") against torch.nn.GRU over a grid of shapes, with the GEMM floor and a contention line.

For every (B, T, I, H) of the grid (B ∈ {1, 8, 32, 128}, T ∈ {35, 200}, I ∈ {28, 256},
H ∈ {64, 256, 1024}), one layer, float32, in one process:

* ``fwd+bwd``: forward over (T, B, I) and backward of ``out.sum()`` into every weight;
* ``fwd``: forward under ``torch.no_grad()`` (inference).

Where the CPU has bf16 units (AVX512-BF16, AMX), grulab.GRU is also timed under
``torch.autocast("cpu", dtype=torch.bfloat16)``, interleaved with the other two: its ratio to
grulab's float32, the kernel its autotune settled on, and its efficiency against the bf16
GEMM floor (the same FLOPs over the best bf16 torch.mm rate).

Both contenders are timed interleaved (round-robin), medians. grulab.GRU runs as a user gets it:
``impl="auto"``, so its first call of each shape measures its candidates (grulab.kernels.autotune) during
the warm-up, and the kernel it settled on is shown. Each row also gets its efficiency against the
GEMM floor: the FLOPs of the layer (forward 6·T·B·H·(I+H), forward+backward 18·T·B·H·(I+H)) over
the best sgemm rate this process reaches, divided by grulab's time.

The contention line: fwd+bwd at the seed shape (32, 35, 28, 256), first on the quiet machine, then
in six trials each with one competing busy process (a Python loop spinning on one core): each
trial's median over its repetitions, as a ratio to the quiet median; worst and median of the six.
For grulab.GRU three ways: the step with its loss ``out.sum()`` and the layer alone (backward from
a given gradient), as a library user gets them, and the step with ``grulab.kernels.threads.steer_torch()``
on, as ``grulab train`` runs (torch's own ops follow the governor's thread count).

Usage::

    python benchmarks/bench_grid.py                 # the grid, the contention line, printed
    python benchmarks/bench_grid.py --write-results # ... and written into results.md
    python benchmarks/bench_grid.py --quick         # a few shapes
    python benchmarks/bench_grid.py --part contention

The section in results.md is keyed by CPU model and the native kernel chosen, so each CPU family
measured keeps its own table.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gru import (fmt_time, gemm_rate, interleaved, meta_lines, results_flags, results_target,  # noqa: E402
                       write_section)

import grulab  # noqa: E402
from grulab.kernels import autotune, threads
from grulab import kernels  # noqa: E402

GRID = dict(B=(1, 8, 32, 128), T=(35, 200), I=(28, 256), H=(64, 256, 1024))
QUICK = [(32, 35, 28, 256), (64, 100, 256, 1024), (1, 200, 28, 1024), (128, 35, 256, 64)]
SEED = (32, 35, 28, 256)


def contenders(shape, train: bool):
    B, T, I, H = shape
    torch.manual_seed(0)
    ref = torch.nn.GRU(I, H)
    ours = grulab.GRU(I, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)

    def run(module, bf16=False):
        def call():
            if train:
                for p in module.parameters():
                    p.grad = None
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out, _ = module(x)
                out.sum().backward()
            else:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    module(x)
        return call

    fns = {"torch.nn.GRU": run(ref), "grulab.GRU": run(ours)}
    if kernels.has_bf16_units():  # the same module under bf16 autocast (its bf16 kernel, measured by autotune)
        fns["grulab.GRU bf16"] = run(ours, bf16=True)
    return fns, ours, x


def reps_for(seconds: float) -> int:
    return max(3, min(15, int(4.0 / max(seconds, 1e-4))))


def measure(shape, train: bool, rate: float) -> dict:
    fns, module, x = contenders(shape, train)
    t0 = time.perf_counter()
    fns["grulab.GRU"]()  # the first call measures its candidates (autotune)
    tune_s = time.perf_counter() - t0
    if "grulab.GRU bf16" in fns:
        fns["grulab.GRU bf16"]()  # autotune of the autocast signature
    t0 = time.perf_counter()
    fns["torch.nn.GRU"]()
    reps = reps_for(time.perf_counter() - t0)
    times = interleaved(fns, reps, warmup=1)
    B, T, I, H = shape
    flops = (18 if train else 6) * T * B * H * (I + H)
    key = autotune.signature(module, x, None, train)
    kernel = autotune.recorded().get(key, {}).get("kernel", "?") if autotune.enabled() else "static"
    return {"shape": shape, "work": "fwd+bwd" if train else "fwd", "nn": times["torch.nn.GRU"], "rate": rate,
            "ours": times["grulab.GRU"], "floor": flops / rate, "kernel": kernel, "reps": reps,
            "tune_s": tune_s, "bf16": times.get("grulab.GRU bf16"),
            "bf16_kernel": autotune.recorded().get(key + " autocast=bf16", {}).get("kernel", "?")}


def grid_table(rows: list[dict], bf16_rate: float = 0.0) -> str:
    """The grid; where the CPU has bf16 units, grulab.GRU under bf16 autocast too: its time, its ratio to
    grulab.GRU float32, its kernel (autotune's choice) and its efficiency against the bf16 GEMM floor."""
    bf = rows and rows[0]["bf16"] is not None
    extra = " bf16 autocast | ÷ grulab fp32 | bf16 kernel | bf16 efficiency |" if bf else ""
    lines = ["| workload | (B, T, I, H) | torch.nn.GRU | grulab.GRU | ratio | kernel | GEMM floor | efficiency |" + extra,
             "|---|---|---|---|---|---|---|---|" + ("---|" * 4 if bf else "")]
    for r in rows:
        line = (f"| {r['work']} | {r['shape']} | {fmt_time(r['nn'])} | {fmt_time(r['ours'])} | "
                f"{r['nn'] / r['ours']:.2f}× | {r['kernel']} | {fmt_time(r['floor'])} | "
                f"{r['floor'] / r['ours']:.0%} |")
        if bf:
            floor16 = r["floor"] * r["rate"] / bf16_rate
            line += (f" {fmt_time(r['bf16'])} | {r['ours'] / r['bf16']:.2f}× | {r['bf16_kernel']} | "
                     f"{floor16 / r['bf16']:.0%} |")
        lines.append(line)
    return "\n".join(lines)


def _trials(fns: dict, trials: int, reps: int) -> tuple[dict, dict]:
    """The quiet median of each of ``fns`` (interleaved), then ``trials`` trials beside one busy
    process: (quiet seconds, ratios to quiet per trial)."""
    for fn in fns.values():  # autotune + warm-up
        fn()
        fn()
    quiet = interleaved(fns, reps, warmup=1)
    per_trial = {name: [] for name in fns}
    for _ in range(trials):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            busy = interleaved(fns, reps, warmup=1)
        finally:
            spinner.kill()
            spinner.wait()
        for name in fns:
            per_trial[name].append(busy[name] / quiet[name])
        time.sleep(0.3)
    return quiet, per_trial


def contention(trials: int = 6, reps: int = 15) -> tuple[str, dict]:
    """Two phases, each its contenders interleaved. As a library user gets it: torch.nn.GRU's step,
    grulab.GRU's step (loss ``out.sum()``) and grulab.GRU's layer alone (its backward seeded with a
    given gradient: no other multi-thread torch op in the step). Then as ``grulab train`` runs it:
    with grulab.kernels.threads.steer_torch() on, grulab.GRU's step beside torch.nn.GRU's (whose count is
    then steered too, torch's count being one setting of the process)."""
    fns, ours, x = contenders(SEED, train=True)
    grad = torch.ones(SEED[1], SEED[0], SEED[3])

    def layer_alone():
        for p in ours.parameters():
            p.grad = None
        out, _ = ours(x)
        out.backward(grad)

    fns["grulab.GRU, layer alone"] = layer_alone
    threads.forget()  # each phase starts from a quiet machine's state
    quiet, per_trial = _trials(fns, trials, reps)
    threads.forget()
    with threads.steering():
        quiet_s, per_trial_s = _trials(contenders(SEED, train=True)[0], trials, reps)
    names = {"torch.nn.GRU": "torch.nn.GRU", "grulab.GRU": "grulab.GRU (loss `out.sum()`)",
             "grulab.GRU, layer alone": "grulab.GRU, layer alone (backward from a given gradient)"}
    rows = [(names[n], quiet[n], per_trial[n]) for n in fns]
    rows += [(f"with steer_torch(): {names[n]}", quiet_s[n], per_trial_s[n]) for n in per_trial_s]
    lines = [f"Contention at {SEED} fwd+bwd: {trials} trials, each the median of {reps} interleaved repetitions "
             "with one competing busy process (a Python loop spinning on one core), as a ratio to the quiet median. "
             "The last two rows: a second phase with grulab.kernels.threads.steer_torch() on (as `grulab train` runs), "
             "where torch's own count follows grulab's governor, torch.nn.GRU's step included.",
             "",
             "| | quiet | trials (× quiet) | worst | median |", "|---|---|---|---|---|"]
    for name, q, ratios in rows:
        lines.append(f"| {name} | {fmt_time(q)} | {', '.join(f'{r:.2f}' for r in ratios)} | "
                     f"{max(ratios):.2f}× | {statistics.median(ratios):.2f}× |")
    return "\n".join(lines), {name: ratios for name, _, ratios in rows}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} shapes of the grid")
    ap.add_argument("--part", choices=("all", "grid", "contention"), default="all")
    results_flags(ap)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    target = results_target(args)

    family = f"{kernels.cpu_model()}, {kernels.select_name('fused', 'cpu', torch.float32, True)}"
    load_before = os.getloadavg()
    parts = []
    if args.part in ("all", "grid"):
        rate = gemm_rate(torch.float32)
        bf16_rate = gemm_rate(torch.bfloat16) if kernels.has_bf16_units() else 0.0
        shapes = QUICK if args.quick else list(itertools.product(*GRID.values()))
        rows = []
        for i, shape in enumerate(shapes):
            for train in (True, False):
                r = measure(shape, train, rate)
                rows.append(r)
                print(f"[{i + 1}/{len(shapes)}] {r['work']:7} {shape}: nn {fmt_time(r['nn'])}, ours "
                      f"{fmt_time(r['ours'])} ({r['nn'] / r['ours']:.2f}×, {r['kernel']}, "
                      f"{r['floor'] / r['ours']:.0%} of floor; autotune {r['tune_s']:.1f} s)"
                      + (f"; bf16 autocast {fmt_time(r['bf16'])} ({r['ours'] / r['bf16']:.2f}× fp32, "
                         f"{r['bf16_kernel']})" if r["bf16"] is not None else ""), flush=True)
        worst = min(rows, key=lambda r: r["nn"] / r["ours"])
        summary = (f"best sgemm rate of this process: {rate / 1e9:.0f} GFLOP/s. Slowest ratio of the grid: "
                   f"{worst['nn'] / worst['ours']:.2f}× ({worst['work']} {worst['shape']}); "
                   f"rows below 0.95×: {sum(r['nn'] / r['ours'] < 0.95 for r in rows)} of {len(rows)}.")
        if bf16_rate:
            summary += f" Best bf16 torch.mm rate: {bf16_rate / 1e9:.0f} GFLOP/s (the bf16 columns' floor)."
        parts.append(summary + "\n\n" + grid_table(rows, bf16_rate))
        print(summary)
    if args.part in ("all", "contention"):
        text, _ = contention()
        parts.append(text)
        print(text)
    meta = meta_lines(argv, load_before[0], cpu=f", {kernels.select_name('fused', 'cpu', torch.float32, True)} kernel") + [
        "- ratio = torch.nn.GRU time / grulab.GRU time (> 1: grulab faster); interleaved medians in one process; "
        "grulab.GRU with impl='auto' (kernel = what its measured dispatch picked)",
    ]
    text = f"## GRU grid: {family}\n\n" + "\n".join(meta) + "\n\n" + "\n\n".join(parts)
    if target is not None:
        write_section(target, text, f"bench_grid {family}" + (" quick" if args.quick else "")
                      + ("" if args.part == "all" else f" {args.part}"))
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
