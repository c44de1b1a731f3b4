"""Benchmark the fused GRU tiers against torch.nn.GRU / torch.nn.LSTM on CPU.

All contenders run in one process, interleaved (each repetition times every
contender once, round-robin), and the median per contender is reported, so a
slow phase of the machine hits everyone alike. Three workloads:

* ``fwd+bwd``  : forward over (T, B, I) + backward of ``out.sum()`` into every
                 weight (what one training step of the layer costs);
* ``fwd``      : forward under ``torch.no_grad()`` (inference);
* ``gen/token``: greedy-generation step, B = 1, one token at a time with the
                 state carried (``nn.GRU`` on a length-1 sequence vs ``gru_step``).
* ``fwd+bwd, bf16 autocast``: grulab.GRU under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
                 with grulab float32 and torch.nn.GRU in bf16 parameters (``bench_bf16.py``:
                 the ratios to each, and the bf16 GEMM floor).

And the first two at the small shape in the other forms the fused kernels keep fast: float64
(torch.nn.GRU in float64 too) and the notes' ``reset_after=False`` (against torch.nn.GRU's
reset-after layer, torch having no reset-before kernel).

Usage::

    python benchmarks/bench_gru.py                  # full run, printed
    python benchmarks/bench_gru.py --write-results  # ... and written into benchmarks/results.md
    python benchmarks/bench_gru.py --quick          # small shape + generation only
    python benchmarks/bench_gru.py --out FILE       # write the table into FILE instead
    python benchmarks/bench_gru.py --runs 3         # three runs, each ratio with its range

Every benchmark here prints; only ``--write-results`` (or ``--out FILE``) writes its section of
``benchmarks/results.md``, which is tracked: a plain run leaves ``git status`` clean.

The machine's load average is recorded before and after: the numbers are only
comparable when nothing else runs on the machine.
"""
from __future__ import annotations

import argparse
import re
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from grulab.kernels import fused
from grulab import reference
from grulab.kernels import cpu_model

SMALL = (32, 35, 28, 256)   # (B, T, I, H)
LARGE = (64, 100, 256, 1024)
GEN = (1, 1, 28, 256)


def interleaved(contenders: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each contender, timed round-robin."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def gemm_rate(dtype: torch.dtype = torch.float32, seconds: float = 2.0) -> float:
    """The best torch.mm rate (FLOP/s) this process reaches in ``dtype``, over a few square sizes: the
    GEMM floor of bench_grid (float32) and bench_bf16 (bf16)."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        deadline = time.perf_counter() + seconds / 3
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def gru_weights(gru: torch.nn.GRU):
    return gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0


def train_and_infer(shape, reps: int, with_reference: bool, dtype: torch.dtype = torch.float32,
                    reset_after: bool = True):
    """fwd+bwd and inference of one layer, each contender interleaved. The other forms (float64,
    the notes' reset_after=False) run against torch.nn.GRU in the same dtype, without the LSTM and
    the reference (torch has no reset-before kernel: its reset-after GRU is the yardstick there)."""
    B, T, I, H = shape
    torch.manual_seed(0)
    main_form = dtype == torch.float32 and reset_after
    gru, lstm = torch.nn.GRU(I, H).to(dtype), torch.nn.LSTM(I, H)
    params = gru_weights(gru)
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.zeros(B, H, dtype=dtype)
    everyone = list(gru.parameters()) + list(lstm.parameters())

    def zero():
        for p in everyone:
            p.grad = None

    def fb_nn_gru():
        zero()
        out, _ = gru(x, h0.unsqueeze(0))
        out.sum().backward()

    def fb_nn_lstm():
        zero()
        out, _ = lstm(x)
        out.sum().backward()

    def fb_fused(backend):
        def run():
            zero()
            out, _ = fused.gru_layer(x, h0, *params, reset_after, backend=backend)
            out.sum().backward()
        return run

    def fb_reference():
        zero()
        out, _ = reference.gru_layer(x, h0, *params, True)
        out.sum().backward()

    def fw(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    fb = {"torch.nn.GRU": fb_nn_gru}
    inf = {"torch.nn.GRU": fw(lambda: gru(x, h0.unsqueeze(0)))}
    if main_form:
        fb["torch.nn.LSTM"], inf["torch.nn.LSTM"] = fb_nn_lstm, fw(lambda: lstm(x))
    if with_reference and main_form:
        fb["reference"] = fb_reference
        inf["reference"] = fw(lambda: reference.gru_layer(x, h0, *params, True))
    for backend in ["torch"] + (["native"] if fused.native_available() else []):
        fb[f"fused {backend}"] = fb_fused(backend)
        inf[f"fused {backend}"] = fw(lambda b=backend: fused.gru_layer(x, h0, *params, reset_after, backend=b))
    return interleaved(fb, reps), interleaved(inf, reps)


def generation(shape, reps: int, tokens: int):
    B, T, I, H = shape
    torch.manual_seed(0)
    gru = torch.nn.GRU(I, H)
    params = tuple(p.detach() for p in gru_weights(gru))
    x = torch.randn(tokens, B, I)

    def nn_gru():
        h = torch.zeros(1, B, H)
        with torch.no_grad():
            for t in range(tokens):
                _, h = gru(x[t : t + 1], h)

    def ours(step):
        def run():
            h = torch.zeros(B, H)
            with torch.no_grad():
                for t in range(tokens):
                    h = step(x[t], h)
        return run

    contenders = {
        "torch.nn.GRU": nn_gru,
        "reference": ours(lambda xt, h: reference.gru_step(xt, h, *params, True).h),
        "fused torch": ours(lambda xt, h: fused.gru_step(xt, h, *params, True, backend="torch")),
    }
    if fused.native_available():
        contenders["fused native"] = ours(lambda xt, h: fused.gru_step(xt, h, *params, True, backend="native"))
    return {k: v / tokens for k, v in interleaved(contenders, reps).items()}


def bf16_row(shape, reps: int) -> dict:
    """fwd+bwd under torch.autocast("cpu", dtype=torch.bfloat16): grulab.GRU (its bf16 kernel where the
    CPU has bf16 units), against torch.nn.GRU float32 (the ratio's base), grulab float32, and torch.nn.GRU
    with bfloat16 parameters (not on autocast's list, so its bf16 is bf16 weights)."""
    from bench_bf16 import contenders  # imports this module: here, not at the top

    fns = contenders(shape)
    names = {"torch.nn.GRU fp32": "torch.nn.GRU", "grulab fp32": "fused native", "grulab bf16 autocast":
             "bf16 autocast", "torch.nn.GRU bf16": "torch.nn.GRU bf16"}
    return interleaved({new: fns[old] for old, new in names.items()}, reps)


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def make_table(runs: list) -> str:
    """Markdown table: per workload and contender, time and ratio to torch.nn.GRU (ranges over runs)."""
    contenders = []
    for rows in runs:
        for _, _, res in rows:
            contenders += [c for c in res if c not in contenders]
    header = "| workload | (B, T, I, H) | " + " | ".join(contenders) + " |"
    lines = [header, "|" + "---|" * (2 + len(contenders))]
    for i, (work, shape, _) in enumerate(runs[0]):
        per_run = [rows[i][2] for rows in runs]  # {contender: seconds} of this row in every run
        cells = []
        for c in contenders:
            if c not in per_run[0]:
                cells.append("not run" if c == "reference" else "–")
                continue
            t = statistics.median(res[c] for res in per_run)
            if c == "torch.nn.GRU":
                cells.append(fmt_time(t))
                continue
            ratios = [res["torch.nn.GRU"] / res[c] for res in per_run]
            cell = f"{fmt_time(t)} ({statistics.median(ratios):.2f}×"
            cell += f" [{min(ratios):.2f}–{max(ratios):.2f}])" if len(runs) > 1 else ")"
            cells.append(cell)
        lines.append(f"| {work} | {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULTS = Path(__file__).with_name("results.md")


def results_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that decide whether a benchmark writes its section of results.md (by default it
    only prints: results.md is tracked, and a quick look must not change it)."""
    ap.add_argument("--write-results", action="store_true",
                    help="write this benchmark's section of benchmarks/results.md (default: print only)")
    ap.add_argument("--out", type=Path, metavar="FILE",
                    help="write the section into FILE instead of benchmarks/results.md (implies writing)")
    ap.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)  # the old opt-out, now the default


def results_target(args: argparse.Namespace) -> Optional[Path]:
    """Where the section goes: --out, else results.md with --write-results, else nowhere."""
    if args.no_write:
        return None
    return args.out if args.out is not None else RESULTS if args.write_results else None


ENV_KEYS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")  # what a BLAS or OpenMP run depends on


def meta_lines(argv, load_before: float, cpu: str = "", also: str = "") -> list[str]:
    """The lines every benchmark's section starts with: date and command, CPU (``cpu``: what to add
    to its model), torch, threads and the environment (``also``: more there), and the load average
    before (``load_before``, os.getloadavg()[0] at the start) and now: the machines are shared."""
    command = " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None else sys.argv[1:]))
    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ENV_KEYS)
    return [
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}; command: `{command}`",
        f"- CPU: {cpu_model()}{cpu}; {os.cpu_count()} logical CPUs; {platform.system()} {platform.release()}",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()}, Python {platform.python_version()}"
        f"{also}; {env}",
        f"- load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} (on {os.cpu_count()} "
        "CPUs; above ~0.5 other processes were competing for the cores)",
    ]


def write_section(path: Path, section: str, key: str) -> None:
    """Replace the section between this key's markers (or append it), keeping the rest of the file."""
    BEGIN, END = f"<!-- {key}: begin -->", f"<!-- {key}: end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape and generation only, few repetitions")
    results_flags(ap)
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the whole measurement N times and report each ratio's range "
                         "(the machine's speed drifts over minutes; interleaving only evens out seconds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default, the number of cores)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    target = results_target(args)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"building/loading the native tier ... backend={fused.backend()}", flush=True)
    load_before = os.getloadavg()
    reps_small = 10 if args.quick else 30
    runs = []  # one list of (workload, shape, {contender: seconds}) per run
    for run in range(args.runs):
        rows = []
        fb, inf = train_and_infer(SMALL, reps_small, with_reference=True)
        rows += [("fwd+bwd", SMALL, fb), ("fwd (no_grad)", SMALL, inf)]
        if not args.quick:
            fb, inf = train_and_infer(LARGE, 5, with_reference=False)
            rows += [("fwd+bwd", LARGE, fb), ("fwd (no_grad)", LARGE, inf)]
        rows.append(("gen/token", GEN, generation(GEN, 10 if args.quick else 30, 200)))
        for shape in [SMALL] + ([] if args.quick else [LARGE]):  # bf16 under autocast (bench_bf16.py has more)
            rows.append(("fwd+bwd, bf16 autocast", shape, bf16_row(shape, reps_small if shape == SMALL else 5)))
        if not args.quick:  # the other forms: float64, and the notes' reset-before GRU
            for label, dtype, reset_after in (("float64", torch.float64, True),
                                              ("reset_after=False", torch.float32, False)):
                fb, inf = train_and_infer(SMALL, reps_small, False, dtype, reset_after)
                rows += [(f"fwd+bwd, {label}", SMALL, fb), (f"fwd (no_grad), {label}", SMALL, inf)]
        runs.append(rows)
        print(f"run {run + 1}/{args.runs} done", flush=True)
    table = make_table(runs)

    meta = meta_lines(argv, load_before[0], also=f"; fused backend: {fused.backend()}; BLAS: MKL (torch's), no OpenBLAS") + [
        f"- medians of interleaved repetitions ({reps_small} small / 5 large / {10 if args.quick else 30}×200 tokens); "
        "ratio = speedup vs torch.nn.GRU; the reference tier is not run at the large shape (too slow)",
        f"- runs: {args.runs}" + (" (each cell: median time over the runs, median ratio, and the "
                                   "ratio's range over the runs in brackets)" if args.runs > 1 else ""),
    ]
    print()
    print("\n".join(meta))
    print()
    print(table)
    if target is not None:
        write_section(target, "## GRU benchmark\n\n" + "\n".join(meta) + "\n\n" + table, "bench_gru")
        print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
