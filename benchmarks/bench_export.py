"""Per-token generation latency: onnxruntime (grulab export) vs grulab's fused step vs torch.nn.GRU.

One generation step of a whole language model at B = 1: a token in, the
logits and the new state out, the state carried from step to step, as
``grulab generate`` runs it. Three contenders, the same weights:

* ``onnxruntime``: the file from :func:`grulab.export_onnx`, through
  :class:`grulab.deploy.onnx_generate.OnnxLanguageModel` (what ``generate --onnx`` calls);
* ``grulab fused``: :meth:`grulab.lm.model.LanguageModel.step` (the fused single step);
* ``torch.nn.GRU``: the same embedding/one-hot and head around a torch.nn.GRU
  holding the same weights, run on a length-1 sequence.

All run in one process, interleaved (each round times every contender on
``--tokens`` steps, in a rotating order), and the medians over the rounds
are reported, with each ratio's median and interquartile range over the rounds. Outputs
are checked to agree first. The machine is shared: prefer many rounds.

Usage::

    python benchmarks/bench_export.py                 # prints a table
    python benchmarks/bench_export.py --write-results # ... and updates benchmarks/results.md
    python benchmarks/bench_export.py --rounds 10     # a quick look
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

import grulab
from grulab.lm.model import LanguageModel, ModelConfig
from grulab.deploy.onnx_generate import OnnxLanguageModel

sys.path.insert(0, str(Path(__file__).parent))
from bench_gru import meta_lines, results_flags, results_target, write_section  # noqa: E402  (this folder)

# (name, ModelConfig keywords): the notes' one-hot model, `grulab train`'s default model, a deeper one
CONFIGS = [
    ("notes: one-hot V=28, H=256", dict(vocab_size=28, hidden=256, embed=0)),
    ("train default: V=90, E=64, H=384", dict(vocab_size=90, hidden=384, embed=64)),
    ("2 layers: V=90, E=64, H=512", dict(vocab_size=90, hidden=512, embed=64, layers=2)),
]


def contenders(model: LanguageModel, onnx_path: Path, threads: int) -> dict:
    """name -> step(token (1,) int64 tensor, state or None) -> (logits (1, V) numpy, state)."""
    lm = OnnxLanguageModel(onnx_path, threads=threads)
    c = model.config
    nn_gru = torch.nn.GRU(c.embed or c.vocab_size, c.hidden, c.layers).eval()
    nn_gru.load_state_dict(model.rnn.state_dict())  # same names and layout as grulab.GRU

    def onnx_step(tok, state):
        logits, state = lm(tok.numpy()[:, None], state)  # (1, 1, V)
        return logits[:, 0], state

    def fused_step(tok, state):
        logits, state = model.step(tok, state)  # (1, V)
        return logits.numpy(), state

    @torch.no_grad()
    def nn_gru_step(tok, state):
        x = model.embedding(tok) if model.embedding is not None else F.one_hot(tok, c.vocab_size).float()  # (1, I)
        out, state = nn_gru(x[None], state)  # (1, 1, H)
        return model.head(out[0]).numpy(), state

    return {"onnxruntime": onnx_step, "grulab fused": fused_step, "torch.nn.GRU": nn_gru_step}


def check_agree(steps: dict, vocab_size: int, n: int = 20) -> float:
    """Greedy decoding through every contender; the logits must agree at every step."""
    worst = 0.0
    toks = {name: torch.tensor([1]) for name in steps}
    states = {name: None for name in steps}
    for _ in range(n):
        outs = {}
        for name, step in steps.items():
            outs[name], states[name] = step(toks[name], states[name])
        ref = outs["torch.nn.GRU"]
        worst = max(worst, *(float(np.abs(o - ref).max()) for o in outs.values()))
        toks = {name: torch.tensor([int(ref.argmax())]) for name in steps}
    assert worst <= 1e-4, f"contenders disagree by {worst}"
    return worst


def time_round(step, tokens: int) -> float:
    """Seconds per token over ``tokens`` greedy steps from a fresh state."""
    tok, state = torch.tensor([1]), None
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits, state = step(tok, state)
        tok = torch.tensor([int(logits.argmax())])
    return (time.perf_counter() - t0) / tokens


def bench(name: str, kw: dict, rounds: int, tokens: int, threads: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**kw)).eval()
    path = grulab.export_onnx(model, tmp / "lm.onnx")
    steps = contenders(model, path, threads)
    diff = check_agree(steps, model.config.vocab_size)
    for step in steps.values():  # warm-up
        time_round(step, tokens)
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            times[k].append(time_round(steps[k], tokens))
    ratios = {k: [t / o for t, o in zip(times[k], times["onnxruntime"])] for k in steps}
    return {"name": name, "diff": diff, "median": {k: statistics.median(v) for k, v in times.items()},
            "ratio": {k: quartiles(v) for k, v in ratios.items()}}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile)."""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q1, q3


def table(results: list[dict]) -> str:
    names = list(results[0]["median"])
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for res in results:
        cells = []
        for k in names:
            us = res["median"][k] * 1e6
            r, lo, hi = res["ratio"][k]
            cells.append(f"{us:.1f} µs" + ("" if k == "onnxruntime" else f" ({r:.2f}× [{lo:.2f}–{hi:.2f}])"))
        lines.append(f"| {res['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=60, help="interleaved rounds (default: 60)")
    ap.add_argument("--tokens", type=int, default=100, help="generation steps per round (default: 100)")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime (default: 1)")
    results_flags(ap)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    target = results_target(args)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(n, kw, args.rounds, args.tokens, args.threads, Path(tmp)) for n, kw in CONFIGS]
    meta = meta_lines(argv, load0, also=f"; onnxruntime {ort.__version__}; {args.threads} thread(s) for torch and onnxruntime") + [
        f"- per token: medians over {args.rounds} interleaved rounds of {args.tokens} greedy steps (B = 1, "
        f"state carried); in brackets: time / onnxruntime's time in the same round, median and "
        f"interquartile range over the rounds "
        f"(above 1 = slower than onnxruntime)",
        f"- outputs agree to {max(r['diff'] for r in results):.1e} (max |logit difference| over 20 greedy steps)",
    ]
    section = "## Export: per-token generation latency\n\n" + "\n".join(meta) + "\n\n" + table(results) + "\n"
    print(section)
    if target is not None:
        write_section(target, section.rstrip("\n"), "bench_export")
        print(f"updated {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
