"""Training parity of ``grulab train --precision bf16`` against ``--precision fp32``, side by side.

Two runs of the same configuration on the bundled Austen corpus, one per precision, each a fresh
process with the same seed, the same batches and the same fixed number of epochs (not a time
budget: both do the same work, so the comparison is of the arithmetic alone, whatever the
machine's load). The default size takes about 3 minutes in float32 on a 2-core AMD EPYC Zen 4.
Prints each run's final validation perplexity, wall time and tokens per second, and the ratio
bf16 / fp32 of the perplexities (the bar: no worse than 1.01).

Usage::

    python benchmarks/bf16_parity.py                   # printed
    python benchmarks/bf16_parity.py --write-results   # ... and written into benchmarks/results.md
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_gru import results_flags, results_target, write_section  # noqa: E402

from grulab import kernels  # noqa: E402


def run(precision: str, epochs: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "grulab", "train", "--corpus", "austen", "--epochs", str(epochs),
           "--max-minutes", "0", "--precision", precision, "--out", str(out), "--no-progress", "--seed", "0",
           *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    return {"precision": precision, "val_ppl": rows[-1]["val_ppl"], "train_ppl": rows[-1]["train_ppl"],
            "seconds": seconds, "tokens": rows[-1]["tokens"], "first_line": first}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="other flags go to both grulab train runs")
    ap.add_argument("--epochs", type=int, default=8, help="epochs of each run (default 8: ~3 min in float32)")
    results_flags(ap)
    return ap


def main(argv=None) -> int:
    args, extra = parser().parse_known_args(argv)
    target = results_target(args)
    if not kernels.has_bf16_units():
        print("note: this CPU has no bf16 units; --precision bf16 runs the GRU in float32 here")
    with tempfile.TemporaryDirectory() as tmp:
        res = [run(p, args.epochs, Path(tmp) / p, extra) for p in ("fp32", "bf16")]
    fp32, bf16 = res
    ratio = bf16["val_ppl"] / fp32["val_ppl"]
    lines = [f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}, machine: {kernels.cpu_model()}, "
             f"{os.cpu_count()} logical CPUs; `grulab train --corpus austen --epochs {args.epochs} --max-minutes 0 "
             f"--seed 0 --precision P` {' '.join(extra)}",
             "", "| precision | val ppl | train ppl | wall time | tokens/s |", "|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['precision']} | {r['val_ppl']:.4f} | {r['train_ppl']:.4f} | {r['seconds']:.0f} s | "
                     f"{r['tokens'] / r['seconds']:,.0f} |")
    lines += ["", f"val ppl bf16 / fp32 = {ratio:.4f} (bar: <= 1.01); wall time fp32 / bf16 = "
              f"{fp32['seconds'] / bf16['seconds']:.2f}", "", f"bf16 run's first line: `{bf16['first_line']}`"]
    text = "\n".join(lines)
    print(text)
    if target is not None:
        write_section(target, "## bf16 training parity (benchmarks/bf16_parity.py)\n\n" + text, "bf16_parity")
        print(f"\nwrote {target}")
    return 0 if ratio <= 1.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
