"""RNN, GRU and LSTM under equal conditions, and hyperparameter sweeps: the notes' exercises.

Every run gets the same data, seed and budget; only the cell (or the swept
setting, any field of :class:`grulab.lm.train.TrainConfig` in :data:`SWEEPABLE`)
differs. The results go to the terminal (a rich table), to
``results.md`` and ``results.csv``, and to ``perplexity.png`` (validation
perplexity against epoch and against wall time, all runs on one figure).

    grulab compare --cells rnn,gru,lstm --corpus austen --max-minutes 1 --out runs/cmp
    grulab compare --sweep hidden=64,128,256 --max-minutes 1 --out runs/sweep
    grulab compare --sweep reset_after=true,false --max-minutes 1 --out runs/forms   # PyTorch's GRU vs the notes'
"""
from __future__ import annotations

import csv
import math
import statistics
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

from grulab.lm import checkpoint, rundir
from grulab.errors import UsageError
from grulab.lm.generate import predict
from grulab.lm.model import CELLS, count_parameters
from grulab.lm.plots import compare_curves
from grulab.lm.train import TrainConfig, read_metrics, train

#: compare's own defaults for training fields: shorter runs, their own directory.
DEFAULTS = dict(out="runs/compare", max_minutes=1.0)
#: What a comparison writes into its directory, besides a directory per run.
FILES = ("results.md", "results.csv", "perplexity.png")
#: The settings --sweep can vary: every training field but where and how a run reports.
SWEEPABLE = tuple(f.name for f in fields(TrainConfig)
                  if f.name not in ("out", "resume", "overwrite", "progress", "prefixes", "predict_length", "eval_every",
                                     "checkpoint_every_minutes"))


def parse_sweep(spec: str) -> tuple[str, list]:
    """``"hidden=64,128"`` -> ("hidden", [64, 128]), typed as the TrainConfig field."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not values.strip():
        raise UsageError(f"--sweep {spec!r}: expected NAME=V1,V2,... e.g. hidden=64,128,256")
    if name not in SWEEPABLE:
        raise UsageError(f"--sweep {spec!r}: cannot sweep {name!r}; choose one of {', '.join(SWEEPABLE)}")
    kind = typing.get_type_hints(TrainConfig)[name]
    words = [v.strip() for v in values.split(",") if v.strip()]
    try:
        parsed = [_parse(kind, w) for w in words]
    except ValueError:
        raise UsageError(f"--sweep {spec!r}: {name} takes {'true/false' if kind is bool else kind.__name__} "
                         "values") from None
    return name, parsed


def _parse(kind: type, word: str):
    """One swept value as the field's type; ValueError if it is not one."""
    if kind is bool:
        if word.lower() not in ("true", "false"):
            raise ValueError(word)
        return word.lower() == "true"
    return kind(word)


def time_to_reach(rows: list[dict], target: float) -> Optional[float]:
    """Seconds until the validation perplexity first reached ``target`` (None if never)."""
    for r in rows:
        if r["val_ppl"] <= target:
            return r["elapsed"]
    return None


def configs(base: TrainConfig, cells: str, sweep: Optional[str]) -> list[tuple[str, TrainConfig]]:
    """(label, config) of each run: ``base`` with one swept value, else with one cell, each in its own
    directory under ``base.out``. Every config is checked here, before the first run starts."""
    if sweep:
        name, values = parse_sweep(sweep)
        changes = [(f"{name}={v}", {name: v}) for v in values]
    else:
        names = [c.strip() for c in cells.split(",") if c.strip()]
        bad = [c for c in names if c not in CELLS]
        if bad or not names:
            raise UsageError(f"--cells {cells!r}: unknown cell {', '.join(bad) or '(none)'}; use a comma-separated "
                             f"subset of {','.join(CELLS)}")
        changes = [(c, {"cell": c}) for c in names]
    out = Path(base.out)
    if base.val_fraction == 0:
        raise UsageError("--val-fraction 0: compare ranks the runs by validation perplexity; give a fraction > 0")
    # the comparison's directory is claimed (and any --overwrite done) by run(); each run's is new
    return [(label, replace(base, out=str(out / label.replace("=", "-")), resume=False, overwrite=False, **change))
            for label, change in changes]


def run(runs: list[tuple[str, TrainConfig]], out: Path, target_ppl: Optional[float] = None,
        overwrite: bool = False) -> list[dict]:
    """Train each of ``runs`` (see :func:`configs`) and write the comparison to ``out``; return one
    result row per run.

    ``out`` is this process's while it runs (:func:`grulab.lm.rundir.claim`); one that holds an earlier
    comparison is refused, or with ``overwrite`` emptied of it (its tables, plot and run directories).
    """
    earlier = [p.name for p in out.iterdir() if p.is_dir() and any((p / f).exists() for f in rundir.TRAIN_FILES)] \
        if out.is_dir() else []
    with rundir.claim(out, overwrite=overwrite, run_files=FILES + tuple(earlier), what="a comparison"):
        return _run(runs, out, target_ppl)


def _run(runs: list[tuple[str, TrainConfig]], out: Path, target_ppl: Optional[float]) -> list[dict]:
    results = []
    for label, config in runs:
        print(f"\n=== {label} ===", flush=True)
        last = train(config)
        ckpt = checkpoint.load(Path(config.out))
        rows = read_metrics(Path(config.out) / "metrics.jsonl")
        prefix = (config.prefixes or ["The "])[0]
        results.append(dict(
            run=label, parameters=count_parameters(ckpt.model),
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows) if rows else math.nan,
            epochs=last.get("epoch", 0), train_ppl=last.get("train_ppl", math.nan), val_ppl=last.get("val_ppl", math.nan),
            seconds=rows[-1]["elapsed"] if rows else 0.0, rows=rows,
            prediction=predict(ckpt.model, ckpt.vocab, prefix, 50),
        ))
    if target_ppl is None:  # the worst final perplexity: every run reaches it, the fastest gets there first
        finals = [r["val_ppl"] for r in results if math.isfinite(r["val_ppl"])]
        target_ppl = max(finals) if finals else math.inf
    for r in results:
        r["time_to_target"] = time_to_reach(r["rows"], target_ppl)
    write_tables(results, out, target_ppl)
    compare_curves(results, out / "perplexity.png")
    print_table(results, target_ppl)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'perplexity.png'}")
    return results


COLUMNS = [("run", "run"), ("parameters", "parameters"), ("tokens_per_s", "tokens/s"), ("epochs", "epochs"),
           ("seconds", "seconds"), ("train_ppl", "train ppl"), ("val_ppl", "val ppl"),
           ("time_to_target", "s to target")]


def _fmt(key: str, value) -> str:
    if value is None:
        return "never"
    if key == "parameters":
        return f"{value:,}"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float):
        if key == "seconds":
            return f"{value:.1f}"
        return f"{value:.2f}" if key in ("epochs", "time_to_target") else f"{value:.3f}"
    return str(value)


def write_tables(results: list[dict], out: Path, target: float) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in COLUMNS] + ["target_ppl", "prediction"])
        for r in results:
            w.writerow([r[k] if r[k] is not None else "" for k, _ in COLUMNS] + [target, r["prediction"]])
    lines = [f"Target validation perplexity: {target:.3f}", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(k, r[k]) for k, _ in COLUMNS) + " |" for r in results]
    lines += ["", "Predictions (greedy, 50 tokens):", ""]
    lines += [f"- **{r['run']}**: `{r['prediction']!r}`" for r in results]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def print_table(results: list[dict], target: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"grulab compare (target val ppl {target:.3f})")
    for _, header in COLUMNS:
        table.add_column(header, justify="left" if header == "run" else "right")
    for r in results:
        table.add_row(*[_fmt(k, r[k]) for k, _ in COLUMNS])
    console = Console()
    console.width = max(console.width, 120)  # all columns, even in a narrow or piped terminal
    console.print(table)
