"""Train a language model on a text: the notes' training loop, made into a tool.

Top to bottom, as nanoGPT's train.py: config, data, model, optimizer, loop.
Per epoch it reports training and validation perplexity, tokens/s and the
model's continuation of a few prefixes; it writes ``metrics.jsonl``, a
perplexity plot and an atomic checkpoint to the run directory.

    from grulab.train import TrainConfig, train
    train(TrainConfig(corpus="austen", max_minutes=2, out="runs/austen"))
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import checkpoint
from .data import build_dataset, min_tokens, num_batches, random_batches, sequential_batches
from .errors import GrulabError
from .model import LanguageModel, ModelConfig, count_parameters, detach_state
from .signals import StopOnSignal


@dataclass
class TrainConfig:
    # data
    corpus: str = "austen"  # a bundled corpus name (austen, tang300, tang-qilu, timemachine) or a path
    level: str = "char"  # tokens: char or word
    min_freq: int = 0  # tokens seen fewer times become <unk>
    d2l_text: bool = False  # the d2l preprocessing: lower case, letters only
    val_fraction: float = 0.1  # the tail of the corpus held out for validation
    # model
    cell: str = "gru"  # gru, lstm or rnn
    hidden: int = 384  # hidden units per layer
    layers: int = 1  # recurrent layers
    dropout: float = 0.0  # dropout between layers and before the output layer
    embed: int = 64  # embedding width; 0 = one-hot input as in the notes
    impl: str = "auto"  # GRU kernel: auto (fused on CPU), fused, torch (torch.nn.GRU's) or reference
    # batches
    batch_size: int = 64  # sequences per batch
    num_steps: int = 64  # time steps per sequence (truncated BPTT length)
    sampling: str = "sequential"  # sequential (state carried, detached) or random (state reset)
    # optimisation
    optimizer: str = "adam"  # adam or sgd
    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # cosine (warm-up, then decay to lr/10 over the budget) or constant
    clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    # budget: training stops at whichever ends first
    epochs: int = 0  # passes over the training text (0 = until --max-minutes); with both, whichever ends first
    max_minutes: float = 3.0  # wall-clock budget in minutes (0 = until --epochs); with both, whichever ends first
    # run
    seed: int = 0  # seeds the model init, the batches and dropout
    out: str = "runs/latest"  # run directory: checkpoint/, metrics.jsonl, perplexity.png
    resume: bool = False  # continue the run in --out where it stopped
    prefixes: list[str] = field(default_factory=list)  # continued every epoch (default: the validation text's start)
    predict_length: int = 60  # tokens predicted per prefix
    eval_every: int = 0  # also evaluate every N batches (0 = at the end of each epoch only)
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        def bad(flag: str, value, want: str) -> GrulabError:
            from .errors import UsageError

            return UsageError(f"--{flag.replace('_', '-')} must be {want}, got {value!r}")

        choices = {"level": ("char", "word"), "cell": ("gru", "lstm", "rnn"),
                   "impl": ("auto", "fused", "torch", "reference"),
                   "sampling": ("sequential", "random"), "optimizer": ("adam", "sgd"),
                   "schedule": ("cosine", "constant")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, getattr(self, name), "one of " + ", ".join(allowed))
        for name in ("hidden", "layers", "batch_size", "num_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, v, "a positive integer")
        for name in ("embed", "epochs", "min_freq", "predict_length", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, v, "an integer >= 0")
        for name, lo, hi, want in [("lr", 0, math.inf, "a positive number"),
                                   ("clip", 0, math.inf, "a number >= 0"),
                                   ("max_minutes", 0, math.inf, "a number >= 0"),
                                   ("dropout", 0, 1, "in [0, 1)"),
                                   ("val_fraction", 0, 1, "in [0, 1)")]:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v < hi
            if not ok or (name == "lr" and v == 0):
                raise bad(name, v, want)
        if self.epochs == 0 and self.max_minutes == 0:
            raise bad("epochs", 0, "> 0 when --max-minutes is 0 (give the run a budget)")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, cell=self.cell, hidden=self.hidden, layers=self.layers,
                           dropout=self.dropout, embed=self.embed, impl=self.impl)


# The notes' settings (d2l, chapter "GRU"): one-hot input, SGD lr 1, clip 1,
# batch 32 × 35 steps, hidden 256, 500 epochs on the Time Machine.
PRESETS: dict[str, dict] = {
    "d2l": dict(cell="gru", hidden=256, layers=1, embed=0, batch_size=32, num_steps=35,
                sampling="random", optimizer="sgd", lr=1.0, schedule="constant", clip=1.0,
                epochs=500, max_minutes=0.0, prefixes=["time traveller", "traveller"]),
}


def with_preset(config: TrainConfig, preset: Optional[str]) -> TrainConfig:
    if preset is None:
        return config
    if preset not in PRESETS:
        raise GrulabError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return replace(config, **PRESETS[preset])


RESUMABLE = ("epochs", "max_minutes", "progress", "prefixes", "predict_length", "eval_every")


def resume_config(out, **changes) -> TrainConfig:
    """The saved config of the run in ``out``, ready to ``train()`` on from where it stopped.

    A resumed run keeps its settings; only the budget and reporting (RESUMABLE) may change.
    """
    from .errors import UsageError

    changed = sorted(set(changes) - set(RESUMABLE))
    if changed:
        raise UsageError(f"{', '.join('--' + c.replace('_', '-') for c in changed)} cannot change on --resume: "
                         "the run keeps its settings; only --epochs, --max-minutes and reporting flags may be given")
    saved = config_from_dict(checkpoint.load(out).train)
    return replace(saved, out=str(out), resume=True, **changes)


def config_to_dict(config: TrainConfig) -> dict:
    return asdict(config)


def config_from_dict(d: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in known})


@torch.no_grad()
def evaluate(model: LanguageModel, ids: torch.Tensor, batch_size: int = 32, num_steps: int = 64) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/token) of ``ids`` under the model, and the token count.

    The text is laid out as up to ``batch_size`` contiguous rows and read
    ``num_steps`` at a time with the state carried, so every token but the
    first of each row is predicted from all the text before it in its row.
    """
    n = len(ids) - 1
    if n < 1:
        return float("nan"), 0
    was_training = model.training
    model.eval()
    rows = max(1, min(batch_size, n // max(num_steps, 1)))
    length = n // rows
    xs = ids[: rows * length].view(rows, length)  # (R, L)
    ys = ids[1 : rows * length + 1].view(rows, length)  # (R, L)
    state, total = None, 0.0
    for start in range(0, length, num_steps):
        logits, state = model(xs[:, start : start + num_steps], state)  # (R, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), ys[:, start : start + num_steps].flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (rows * length), rows * length


def perplexity(nll: float) -> float:
    """exp(mean negative log-likelihood), inf past float range."""
    return math.exp(nll) if nll < 709 else math.inf


def lr_at(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` ∈ [0, 1] of the budget."""
    if config.schedule == "constant":
        return config.lr
    warmup = 0.02
    if progress < warmup:
        return config.lr * (0.1 + 0.9 * progress / warmup)
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _log(msg: str) -> None:
    print(msg, flush=True)


def train(config: TrainConfig, on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train as ``config`` says; return the last epoch's metrics.

    Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and raises signals.Stopped (a KeyboardInterrupt); a NaN or
    infinite loss raises GrulabError and leaves the last good checkpoint.
    """
    from .generate import predict  # generation imports the model; keep train importable alone

    out = Path(config.out)
    # -------------------------------------------------------------- resume or start
    resumed = None
    if config.resume:
        resumed = checkpoint.load(out, with_training_state=True)
        checkpoint.trim_metrics(out, resumed)  # rows written after that save: their training is redone
        if resumed.model.config != config.model_config(resumed.model.config.vocab_size):
            raise GrulabError(f"the model in {resumed.path} is not the one this config describes; "
                              "build the config with grulab.train.resume_config(out)")
    torch.manual_seed(config.seed)

    # -------------------------------------------------------------- data
    data = build_dataset(config.corpus, config.level, config.min_freq, config.d2l_text, config.val_fraction)
    vocab = data.vocab
    if resumed is not None and resumed.vocab != vocab:
        raise GrulabError(f"the corpus {config.corpus!r} no longer gives the vocabulary saved in {resumed.path}; "
                          "resume with the same corpus or start a new run in another --out")
    batches = sequential_batches if config.sampling == "sequential" else random_batches
    per_epoch = num_batches(len(data.train_ids), config.batch_size, config.num_steps, config.sampling)
    if per_epoch < 1:
        need = min_tokens(config.batch_size, config.num_steps, config.sampling)
        raise GrulabError(f"corpus {config.corpus!r} is too short for one batch: {len(data.train_ids):,} training "
                          f"tokens, {need:,} needed; lower --batch-size or --num-steps, or use a longer text")
    prefixes = config.prefixes or [vocab.decode(data.val_ids[:8] if len(data.val_ids) >= 8 else data.train_ids[:8])]

    # -------------------------------------------------------------- model and optimizer
    model = resumed.model if resumed is not None else LanguageModel(config.model_config(len(vocab)))
    model.train()
    params = list(model.parameters())
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr)
    else:
        opt = torch.optim.SGD(params, lr=config.lr)
    progress = dict(epoch=0, batch=0, step=0, tokens=0, elapsed=0.0)
    batch_gen = torch.Generator().manual_seed(config.seed)
    epoch_gen_state = batch_gen.get_state()
    state = None
    if resumed is not None:
        if resumed.optimizer is not None:
            opt.load_state_dict(resumed.optimizer)
        progress.update(resumed.progress)
        extra = resumed.extra
        if "batch_gen" in extra:
            epoch_gen_state = extra["batch_gen"]
        if "torch_rng" in extra:
            torch.set_rng_state(extra["torch_rng"])
        if "state_h" in extra:
            state = (extra["state_h"], extra["state_c"]) if "state_c" in extra else extra["state_h"]
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / checkpoint.METRICS
    if resumed is None:
        metrics_path.write_text("")

    budget_s = config.max_minutes * 60
    total_steps = config.epochs * per_epoch

    def budget_progress(elapsed: float, step: int) -> float:
        """How far through the budget: by steps when --epochs is set (so a seeded run is
        reproducible), else by wall time."""
        if total_steps:
            return min(1.0, step / total_steps)
        return min(1.0, elapsed / budget_s)

    _log(f"grulab train: {config.corpus} ({len(data.train_ids):,} train / {len(data.val_ids):,} val "
         f"{config.level} tokens, vocab {len(vocab)}), {config.cell} {config.layers}×{config.hidden}, "
         f"{count_parameters(model):,} parameters, {per_epoch} batches of {config.batch_size}×{config.num_steps} per epoch"
         + (f", resumed at epoch {progress['epoch'] + 1}" if resumed is not None else ""))

    # -------------------------------------------------------------- the loop
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), disable=not config.progress,
                   transient=True)
    last: dict = {}
    start_time = time.perf_counter() - progress["elapsed"]
    seg = dict(loss=0.0, tokens=0, train_s=0.0)  # training since the last report

    def save(carried) -> None:
        """Checkpoint the model, the optimizer, the position and what makes the rest reproducible."""
        extra = {"batch_gen": epoch_gen_state, "torch_rng": torch.get_rng_state()}  # epoch-start batch RNG
        if carried is not None:  # the hidden state carried into the next batch (sequential sampling)
            extra.update(zip(("state_h", "state_c"), carried if isinstance(carried, tuple) else (carried,)))
        checkpoint.save(out, model, vocab, config_to_dict(config), dict(progress), opt, extra)

    def checkpoint_and_report(epoch_pos: float, carried) -> dict:
        """Evaluate; stop if training diverged; save the checkpoint; log a metrics line and predictions."""
        progress["elapsed"] = time.perf_counter() - start_time
        val_nll, _ = evaluate(model, data.val_ids, 32, config.num_steps)
        row = dict(epoch=round(epoch_pos, 4), step=progress["step"], tokens=progress["tokens"],
                   train_ppl=perplexity(seg["loss"] / max(seg["tokens"], 1)), val_ppl=perplexity(val_nll),
                   tokens_per_s=seg["tokens"] / max(seg["train_s"], 1e-9), elapsed=progress["elapsed"],
                   lr=opt.param_groups[0]["lr"])
        if math.isinf(row["train_ppl"]) or math.isinf(row["val_ppl"]) or (len(data.val_ids) > 1 and val_nll != val_nll):
            diverged(f"epoch {row['epoch']:.2f}", f"the perplexity is {row['train_ppl']} (train), {row['val_ppl']} (val)")
        seg.update(loss=0.0, tokens=0, train_s=0.0)
        # the row goes first: the checkpoint records how much of metrics.jsonl is its own
        checkpoint.append_metrics(out, {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                        for k, v in row.items()})
        save(carried)
        bar.console.print(
            f"epoch {row['epoch']:.2f}  train ppl {row['train_ppl']:.3f}  val ppl {row['val_ppl']:.3f}  "
            f"{row['tokens_per_s']:,.0f} tok/s  lr {row['lr']:.2e}  {row['elapsed']:.0f}s", highlight=False)
        for p in prefixes:
            bar.console.print(f"  {predict(model, vocab, p, config.predict_length)!r}", highlight=False, markup=False)
        if on_epoch is not None:
            on_epoch(row)
        return row

    def diverged(where: str, what: str):
        kept = checkpoint.find(out) if (out / checkpoint.CHECKPOINT).exists() else None
        raise GrulabError(f"training diverged at {where}: {what}; "
                          + (f"the last good checkpoint is kept in {kept}; " if kept else "no checkpoint was saved; ")
                          + "lower --lr or set --clip")

    done = False
    with bar, StopOnSignal() as interrupt:
        while not done:
            epoch = progress["epoch"] + 1
            if config.epochs and epoch > config.epochs:
                break
            batch_gen.set_state(epoch_gen_state)  # the epoch's batches, reproducible on resume
            if progress["batch"] == 0:
                state = None
            task = bar.add_task("train", total=per_epoch, epoch=epoch, loss=float("nan"), completed=progress["batch"])
            for i, (X, Y) in enumerate(batches(data.train_ids, config.batch_size, config.num_steps, batch_gen)):
                if i < progress["batch"]:
                    continue  # resuming mid-epoch: these batches were trained on
                if interrupt.requested:  # Ctrl-C, SIGTERM, SIGHUP: stop between batches, where the state is consistent
                    progress["elapsed"] = time.perf_counter() - start_time
                    save(state)
                    bar.stop()
                    _log(f"interrupted: checkpoint saved to {out / checkpoint.CHECKPOINT}; "
                         f"continue with: grulab train --resume --out {out}")
                    raise interrupt.interrupt()
                t0 = time.perf_counter()
                if budget_s and t0 - start_time >= budget_s:
                    done = True
                    break
                # state: carried (detached) for sequential batches, fresh for random ones
                state = detach_state(state) if config.sampling == "sequential" else None
                for g in opt.param_groups:
                    g["lr"] = lr_at(config, budget_progress(t0 - start_time, progress["step"]))
                logits, state = model(X, state)  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1), Y.flatten())
                if not torch.isfinite(loss):
                    diverged(f"epoch {epoch}, batch {i + 1}", f"the loss is {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.clip)
                opt.step()
                state = detach_state(state)
                progress["batch"] = i + 1
                progress["step"] += 1
                progress["tokens"] += Y.numel()
                seg["loss"] += loss.item() * Y.numel()
                seg["tokens"] += Y.numel()
                seg["train_s"] += time.perf_counter() - t0
                bar.update(task, advance=1, loss=loss.item())
                if config.eval_every and progress["step"] % config.eval_every == 0 and progress["batch"] < per_epoch:
                    last = checkpoint_and_report(epoch - 1 + progress["batch"] / per_epoch, state)
            bar.remove_task(task)
            # ---------------------------------------------------------- end of epoch (or of the budget)
            if progress["batch"] >= per_epoch:
                progress["epoch"], progress["batch"] = epoch, 0
                epoch_gen_state = batch_gen.get_state()  # the next epoch starts from here
                state = None
            if seg["tokens"]:
                last = checkpoint_and_report(epoch - 1 + (progress["batch"] or per_epoch) / per_epoch, state)
            elif done or progress["batch"]:
                break
    if not last:
        _log(f"nothing to train: the run's budget ({config.epochs or '-'} epochs, {config.max_minutes:g} minutes) "
             f"is used up; give a larger --epochs or --max-minutes")
        return last
    plot_metrics(metrics_path, out / "perplexity.png")
    return last


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def perplexity_axis(ax, xlabel: str, ylabel: str) -> None:
    """A log-scale perplexity axis with plain-number ticks, a grid and a legend."""
    from matplotlib.ticker import ScalarFormatter

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend()


def plot_metrics(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Training and validation perplexity against epoch, as a PNG."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in rows], [r["train_ppl"] for r in rows], marker="o", label="train")
    ax.plot([r["epoch"] for r in rows], [r["val_ppl"] for r in rows], marker="o", label="validation")
    perplexity_axis(ax, "epoch", "perplexity")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
