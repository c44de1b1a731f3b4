"""Benchmark grulab.MinGRU on CPU against its GEMM floor, the GRUs and minGRU-pytorch.

Everything runs in one process, interleaved (each repetition times every
contender once, round-robin); medians are reported. Two parts:

* ``scan``: the linear recurrence alone, ``h_t = a_t ⊙ h_{t-1} + b_t`` over
  (T, B, H), three ways (the backward of a minGRU layer is the same kind of
  scan, run in reverse): the sequential loop of ``scan="fused"`` (one in-place
  ``addcmul`` per step), a two-level chunked scan (steps within √T-long chunks
  in parallel across chunks, then one carry per chunk), and Heinsen's
  log-space scan (``cumsum`` + ``logcumsumexp``, needs b > 0) of the paper.
* ``layer``: forward + backward (``out.backward(grad)`` with a fixed random
  ``grad``) into the input and every weight, for: the ``Linear(D, 2H)`` floor (a minGRU's two projections and
  nothing else), MinGRU (``scan="fused"`` and ``"log"``), grulab.GRU
  (``impl="auto"``), torch.nn.GRU and minGRU-pytorch's ``minGRU`` (from PyPI:
  ``pip install -e .[bench]``). Run twice: at the same width (H = D for
  all), and at matched parameter counts (the minGRUs get the GRU's parameter
  count, i.e. a wider state, H' = 3H(D + H + 2) / (2(D + 1))).
* ``lm``: training tokens/s of the character language model
  (:class:`grulab.lm.model.LanguageModel`, vocabulary 76 as Austen's, embedding
  64, hidden D for every cell): one optimizer step (forward, cross-entropy,
  backward, Adam) on a (B, T) batch, for ``--cell mingru``, ``mingru-block``,
  ``gru`` (grulab.GRU, the fused kernel) and ``gru`` on torch.nn.GRU's kernels
  (``impl="torch"``).

Usage::

    python benchmarks/bench_mingru.py                 # print only
    python benchmarks/bench_mingru.py --write-results # ... and write its section of benchmarks/results.md
    python benchmarks/bench_mingru.py --reps 5 --T 35 # quick look
    python benchmarks/bench_mingru.py --part lm       # the language models' training tokens/s only

The section between the ``bench_mingru threads=N`` markers of the output
file is replaced (one section per thread count); the rest of the file is kept.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable

import torch
from torch import nn

import grulab
from bench_gru import interleaved, meta_lines, results_flags, results_target, write_section  # this folder: run as python benchmarks/bench_mingru.py
from grulab import MinGRU
from grulab.lm.model import LanguageModel, ModelConfig

try:
    from minGRU_pytorch import minGRU as LucidMinGRU
except ImportError:  # pragma: no cover - reported in the table
    LucidMinGRU = None



# -- the scan alone --------------------------------------------------------------------


def scan_sequential(a, b, h0):
    """One in-place addcmul per step (what MinGRU's fused scan runs, forward and backward)."""
    out = b.clone()  # (T, B, H)
    outs, a_t = out.unbind(0), a.unbind(0)
    h = h0
    for t in range(len(outs)):
        h = torch.addcmul(outs[t], a_t[t], h, out=outs[t])
    return out


def scan_chunked(a, b, h0):
    """Two levels: within chunks of C ≈ √T steps, all chunks at once; then one carry per chunk."""
    T, B, H = a.shape
    C = max(1, round(math.sqrt(T)))
    n = -(-T // C)
    pad = n * C - T
    if pad:  # a = 1, b = 0 past the end leaves the state as it is
        a = torch.cat([a, a.new_ones(pad, B, H)])
        b = torch.cat([b, b.new_zeros(pad, B, H)])
    A, Bv = a.view(n, C, B, H), b.view(n, C, B, H)
    h = torch.empty_like(Bv)  # (n, C, B, H) the scan within each chunk, from 0
    P = torch.empty_like(Bv)  # (n, C, B, H) products of a within each chunk
    h[:, 0], P[:, 0] = Bv[:, 0], A[:, 0]
    for i in range(1, C):
        torch.addcmul(Bv[:, i], A[:, i], h[:, i - 1], out=h[:, i])
        torch.mul(P[:, i - 1], A[:, i], out=P[:, i])
    c = h0
    for j in range(n):  # add the state carried in from the chunks before
        h[j].addcmul_(P[j], c)
        c = h[j, -1]
    return h.view(n * C, B, H)[:T]


def scan_log(a, b, h0):
    """Heinsen (2023): h = exp(a* + logcumsumexp(log b − a*)) + exp(a*) h0, a* = cumsum(log a); b > 0."""
    a_star = torch.cumsum(torch.log(a), 0)
    return torch.exp(a_star + torch.logcumsumexp(torch.log(b) - a_star, 0)) + torch.exp(a_star) * h0


def bench_scans(T: int, B: int, H: int, reps: int) -> dict:
    torch.manual_seed(0)
    a = torch.rand(T, B, H) * 0.98 + 0.01  # 1 − z in (0, 1)
    b = torch.rand(T, B, H) + 0.01  # z ⊙ h̃ > 0 (the log-space scan needs it)
    h0 = torch.randn(B, H)  # any sign
    ref = scan_sequential(a.double(), b.double(), h0.double())
    fns = {"sequential": scan_sequential, "chunked": scan_chunked, "log-space": scan_log}
    err = {k: (fn(a, b, h0).double() - ref).abs().max().item() for k, fn in fns.items()}
    times = interleaved({k: (lambda fn=fn: fn(a, b, h0)) for k, fn in fns.items()}, reps)
    return {"times": times, "err": err}


# -- the layer ---------------------------------------------------------------------------


def matched_width(D: int, H: int) -> int:
    """The minGRU width with a GRU(D, H)'s parameter count: 2H'(D + 1) = 3H(D + H + 2)."""
    return round(3 * H * (D + H + 2) / (2 * (D + 1)))


def bench_layers(T: int, B: int, D: int, H: int, H_min: int, reps: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(T, B, D, requires_grad=True)  # time-major
    xb = torch.randn(B, T, D, requires_grad=True)  # minGRU-pytorch is batch-first
    models: dict[str, tuple[nn.Module, Callable]] = {
        "Linear(D, 2H) floor": (nn.Linear(D, 2 * H_min), lambda m: m(x)),
        "MinGRU fused": (MinGRU(D, H_min), lambda m: m(x)[0]),
        "MinGRU log": (MinGRU(D, H_min, scan="log"), lambda m: m(x)[0]),
        "grulab.GRU": (grulab.GRU(D, H, impl="auto"), lambda m: m(x)[0]),
        "torch.nn.GRU": (nn.GRU(D, H), lambda m: m(x)[0]),
    }
    if LucidMinGRU is not None:
        lucid = LucidMinGRU(D, expansion_factor=H_min / D, proj_out=False)
        models["minGRU-pytorch"] = (lucid, lambda m: m(xb))

    grads: dict[torch.Size, torch.Tensor] = {}  # one fixed upstream gradient per output shape

    def run(m, f):
        def go():
            for p in (x, xb, *m.parameters()):
                p.grad = None
            out = f(m)
            if out.shape not in grads:
                grads[out.shape] = torch.randn(out.shape)
            out.backward(grads[out.shape])

        return go

    times = interleaved({k: run(m, f) for k, (m, f) in models.items()}, reps)
    params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in models.items()}
    return {"times": times, "params": params}


# -- the language model's training step ---------------------------------------------------

#: The LM contenders: label -> ModelConfig fields (besides the shared width).
LM_CELLS = {
    "mingru": dict(cell="mingru"),
    "mingru-block": dict(cell="mingru-block"),
    "gru (grulab.GRU)": dict(cell="gru", impl="auto"),
    "gru (torch.nn.GRU kernels)": dict(cell="gru", impl="torch"),
}


def bench_lm(T: int, B: int, H: int, reps: int, vocab: int = 76, embed: int = 64) -> dict:
    """Median seconds of one training step (forward, loss, backward, Adam) per LM, interleaved."""
    torch.manual_seed(0)
    idx = torch.randint(vocab, (B, T + 1))  # (B, T+1): inputs and next-token targets
    steps, params = {}, {}
    for label, kw in LM_CELLS.items():
        model = LanguageModel(ModelConfig(vocab_size=vocab, hidden=H, embed=embed, **kw)).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            logits, _ = model(idx[:, :-1])  # (B, T, V)
            torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1)).backward()
            opt.step()

        steps[label], params[label] = step, sum(p.numel() for p in model.parameters())
    return {"times": interleaved(steps, reps), "params": params}


def lm_table(results: list[tuple[int, dict]], B: int) -> str:
    names = list(results[0][1]["times"])
    params = results[0][1]["params"]
    ours = "mingru"
    lines = ["| T | " + " | ".join(f"{n} ({params[n] / 1e3:.0f}k)" for n in names)
             + " | mingru / grulab.GRU | mingru / torch.nn.GRU |", "|" + "---|" * (len(names) + 3)]
    for T, r in results:
        tok = {n: B * T / r["times"][n] for n in names}  # tokens per second
        lines.append(f"| {T} | " + " | ".join(f"{tok[n]:,.0f}" for n in names)
                     + f" | {tok[ours] / tok['gru (grulab.GRU)']:.2f}× | {tok[ours] / tok['gru (torch.nn.GRU kernels)']:.2f}× |")
    return "\n".join(lines)


def lm_section(args, argv) -> str:
    B, H = args.batch, args.dim
    load_before = os.getloadavg()
    rows = []
    for T in args.T:
        rows.append((T, bench_lm(T, B, H, args.reps)))
        print(f"lm T={T}: " + ", ".join(f"{k} {ms(v)}" for k, v in rows[-1][1]["times"].items()), flush=True)
    return "\n".join([
        f"## minGRU language models: training tokens/s, {torch.get_num_threads()} thread(s)",
        "",
        *meta_lines(argv, load_before[0]),
        f"- one training step of grulab.lm.model.LanguageModel (vocabulary 76, embedding 64, hidden {H}, one layer or "
        f"block), forward + cross-entropy + backward + Adam on a ({B}, T) batch; medians of {args.reps} "
        f"interleaved repetitions in one process; tokens/s = {B}·T / median; parameter counts in brackets",
        "",
        lm_table(rows, B),
    ])


# -- report ------------------------------------------------------------------------------


def ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 0.01 else f"{s * 1e3:.2f} ms"


def layer_table(results: list[tuple[int, dict]]) -> str:
    names = list(results[0][1]["times"])
    params = results[0][1]["params"]
    head = "| T | " + " | ".join(f"{n} ({params[n] / 1e3:.0f}k)" for n in names) + \
        " | MinGRU / floor | minGRU-pytorch / MinGRU | nn.GRU / MinGRU | grulab.GRU / MinGRU |"
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for T, r in results:
        t = r["times"]
        ours = t["MinGRU fused"]
        ratio = lambda k: f"{t[k] / ours:.2f}×" if k in t else "–"  # noqa: E731
        lines.append(
            f"| {T} | " + " | ".join(ms(t[n]) for n in names)
            + f" | {ours / t['Linear(D, 2H) floor']:.2f}× | {ratio('minGRU-pytorch')} | {ratio('torch.nn.GRU')}"
            + f" | {ratio('grulab.GRU')} |"
        )
    return "\n".join(lines)


def scan_table(results: list[tuple[int, dict]], B: int, H: int) -> str:
    lines = [f"| T (B = {B}, H = {H}) | sequential | chunked (C ≈ √T) | log-space | max abs error vs float64 (seq / chunk / log) |",
             "|---|---|---|---|---|"]
    for T, r in results:
        t, e = r["times"], r["err"]
        lines.append(f"| {T} | {ms(t['sequential'])} | {ms(t['chunked'])} | {ms(t['log-space'])} | "
                     f"{e['sequential']:.1e} / {e['chunked']:.1e} / {e['log-space']:.1e} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[35, 256, 1024], help="sequence lengths")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dim", type=int, default=256, help="D = input size = hidden size at the same width")
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions per shape (medians)")
    results_flags(ap)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default, the number of cores)")
    ap.add_argument("--part", choices=["all", "layer", "lm"], default="all",
                    help="the scan and layer benchmarks, the language models' training tokens/s, or both "
                         "(each writes its own section)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    target = results_target(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps < 1 or args.batch < 1 or args.dim < 1 or min(args.T) < 1:
        ap.error("--reps, --batch, --dim and --T must be >= 1")
    if args.part in ("all", "lm"):
        section = lm_section(args, argv)
        print("\n" + section)
        if target is not None:
            write_section(target, section, f"bench_mingru lm threads={torch.get_num_threads()}")
            print(f"\nwrote its section of {target}")
        if args.part == "lm":
            return 0
    B, D = args.batch, args.dim
    load_before = os.getloadavg()

    scans = []
    for T in args.T:
        scans.append((T, bench_scans(T, B, D, args.reps)))
        print(f"scan T={T}: " + ", ".join(f"{k} {ms(v)}" for k, v in scans[-1][1]["times"].items()), flush=True)
    tables = []
    for label, H_min in (("same width", D), ("matched parameters", matched_width(D, D))):
        rows = []
        for T in args.T:
            rows.append((T, bench_layers(T, B, D, D, H_min, args.reps)))
            print(f"{label} T={T}: " + ", ".join(f"{k} {ms(v)}" for k, v in rows[-1][1]["times"].items()), flush=True)
        tables.append((label, H_min, layer_table(rows)))
    lucid = "minGRU-pytorch " + (__import__("importlib.metadata").metadata.version("minGRU-pytorch")
                                 if LucidMinGRU is not None else "not installed (pip install -e .[bench])")
    parts = [
        f"## minGRU (grulab.MinGRU), {torch.get_num_threads()} thread(s)",
        "",
        *meta_lines(argv, load_before[0], also=f"; {lucid}"),
        f"- medians of {args.reps} interleaved repetitions in one process; float32; B = {B}, D = {D}",
        "",
        "### The scan alone (forward, no autograd)",
        "",
        scan_table(scans, B, D),
    ]
    for label, H_min, table in tables:
        parts += [
            "",
            f"### Layer forward + backward, {label} (minGRUs H = {H_min}, GRUs H = {D})",
            "",
            "Parameter counts in brackets. Ratios: > 1 means MinGRU (fused) is that many times faster; "
            "MinGRU / floor is its cost over its own two projections alone.",
            "",
            table,
        ]
    section = "\n".join(parts)
    print()
    print(section)
    if target is not None:
        write_section(target, section, f"bench_mingru threads={torch.get_num_threads()}")
        print(f"\nwrote its section of {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
