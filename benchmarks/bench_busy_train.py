"""A language-model training step beside a busy process, with grulab.kernels.threads.steer_torch() off and on.

The step is `grulab train`'s (grulab.lm.train.TrainConfig's default model, random token batches):
forward, summed cross-entropy, backward, clipping, Adam. Each round measures, steering off and
then on, the median step on the quiet machine and then beside one competing busy process (a Python
loop spinning on one core), and prints busy ÷ quiet. Each phase starts from a quiet machine's
governor state (threads.forget()).

    python benchmarks/bench_busy_train.py --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from grulab.kernels import threads
from grulab.lm.model import LanguageModel
from grulab.lm.train import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per median")
    p.add_argument("--vocab", type=int, default=80)
    args = p.parse_args()

    config = TrainConfig()
    torch.manual_seed(0)
    model = LanguageModel(config.model_config(args.vocab))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    X = torch.randint(0, args.vocab, (config.batch_size, config.num_steps))  # (B, T)
    Y = torch.randint(0, args.vocab, (config.batch_size, config.num_steps))

    def step() -> None:
        logits, _ = model(X)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="sum")
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        (loss / X.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()

    def median_step() -> float:
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"model: {config.model_config(args.vocab)}; batch {config.batch_size} × {config.num_steps}; "
          f"torch threads {torch.get_num_threads()}")
    for _ in range(5):
        step()
    ratios = {False: [], True: []}
    for r in range(args.rounds):
        for on in (False, True):
            threads.forget()
            with threads.steering(on):
                quiet = median_step()
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    time.sleep(0.3)
                    busy = median_step()
                finally:
                    spinner.kill()
                    spinner.wait()
                time.sleep(0.3)
            ratios[on].append(busy / quiet)
            print(f"round {r + 1}, steering {'on ' if on else 'off'}: quiet {quiet * 1e3:.1f} ms, "
                  f"busy {busy * 1e3:.1f} ms ({busy / quiet:.2f}×)", flush=True)
    for on in (False, True):
        print(f"steering {'on ' if on else 'off'}: busy ÷ quiet worst {max(ratios[on]):.2f}×, "
              f"median {statistics.median(ratios[on]):.2f}×")


if __name__ == "__main__":
    main()
