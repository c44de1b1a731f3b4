"""Train a language model on a text: the notes' training loop, made into a tool.

:func:`train` reads top to bottom, as nanoGPT's train.py: config, data, model,
optimizer, then the loop, one batch at a time through the steps below it
(:func:`train_step`, :func:`report`, :func:`stop`). Where the run stands is one
:class:`RunState`, which checkpoints itself, so ``--resume`` goes on exactly as
if the run had never stopped. Per report it prints training and validation
perplexity, tokens/s and the model's continuation of a few prefixes, and
writes ``metrics.jsonl``, a perplexity plot and an atomic checkpoint.

    from grulab.lm.train import TrainConfig, train
    train(TrainConfig(corpus="austen", max_minutes=2, out="runs/austen"))
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from grulab import kernels
from grulab.lm import checkpoint, plots, rundir
from grulab.kernels import native, threads
from grulab.lm.data import CORPORA, SAMPLERS, Dataset, build_dataset, min_tokens, num_batches
from grulab.lm.distributed import MARKER, Dist, current, mark_job, talking
from grulab.errors import GrulabError, UsageError
from grulab.lm.model import LanguageModel, State, count_parameters, detach_state
# TrainConfig and the presets live in settings; their names stay importable from here too
from grulab.lm.settings import (LOSSES, NOTES_PREFIXES, OPTIMIZERS, PRESETS, SCHEDULES, Preset,  # noqa: F401
                                TrainConfig, with_preset)
from grulab.lm.signals import StopOnSignal, Stopped

METRICS = checkpoint.METRICS


def resume_config(out, **changes) -> TrainConfig:
    """The saved config of the run in ``out``, ready to ``train()`` on from where it stopped.

    A resumed run keeps its settings; only the budget and reporting fields may change.
    """
    resumable = [f.name for f in fields(TrainConfig) if f.metadata["resumable"]]
    changed = sorted(set(changes) - set(resumable))
    if changed:
        raise UsageError(f"{', '.join('--' + c.replace('_', '-') for c in changed)} cannot change on --resume: "
                         "the run keeps its settings; only --epochs, --max-minutes and reporting flags may be given")
    live = checkpoint.still_training(Path(out))
    if live is not None:
        raise GrulabError(f"{live}; wait for it to end, or stop it (Ctrl-C or SIGTERM saves a checkpoint), "
                          "then --resume")
    ckpt = checkpoint.load(out)
    try:
        saved = TrainConfig.from_dict(ckpt.train)
    except GrulabError as e:
        raise GrulabError(f"the training config in {ckpt.path / 'config.json'} is not valid ({e}); "
                          "resume is not possible, start a new run in another --out") from None
    return replace(saved, out=str(out), resume=True, overwrite=False, **changes)


@dataclass
class RunState:
    """Where a run stands: everything ``--resume`` needs to go on exactly as if it never stopped.

    ``save`` writes it, with the model and optimizer, as the run's checkpoint
    (``progress`` in config.json, the RNG states and carried state in
    state.safetensors); ``restore`` reads it back.
    """

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches finished in the current epoch
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens seen
    elapsed: float = 0.0  # seconds of training, over all sessions of the run
    rng: torch.Generator = field(default_factory=torch.Generator)  # draws the batches
    epoch_rng: Optional[Tensor] = None  # rng's state at the start of the current epoch
    carried: Optional[State] = None  # the hidden state carried into the next batch (sequential sampling)

    PROGRESS = ("epoch", "batch", "step", "tokens", "elapsed")  # what config.json's "progress" holds

    @classmethod
    def start(cls, seed: int, dist: Dist = Dist()) -> "RunState":
        """A new run. The batch RNG is the same on every process (each takes its rows of the same batch);
        torch's RNG (dropout) differs between processes."""
        rng = torch.Generator().manual_seed(seed)
        if dist.rank:
            torch.manual_seed((seed + 1_000_003 * dist.rank) % 2**64)
        return cls(rng=rng, epoch_rng=rng.get_state())

    @classmethod
    def restore(cls, ckpt: checkpoint.Checkpoint, seed: int, dist: Dist = Dist()) -> "RunState":
        """The state saved in ``ckpt`` (loaded with its training state); sets torch's RNG as it was
        (rank 0's; the other ranks draw from their own seed). The carried state is the whole batch's:
        this process keeps its rows, so a run resumes on any number of processes."""
        run = replace(cls.start(seed, dist), **{k: ckpt.progress[k] for k in cls.PROGRESS if k in ckpt.progress})
        extra = ckpt.extra
        if "batch_gen" in extra:
            run.epoch_rng = extra["batch_gen"]
        if "torch_rng" in extra:
            torch.set_rng_state(extra["torch_rng"])
        if dist.rank:
            torch.manual_seed((seed + 1_000_003 * dist.rank + run.step) % 2**64)
        if "state_h" in extra:
            carried = (extra["state_h"], extra["state_c"]) if "state_c" in extra else (extra["state_h"],)
            rows = dist.rows(carried[0].shape[1])
            carried = tuple(h[:, rows] for h in carried)  # (L, b, H): this process's rows
            run.carried = carried if len(carried) > 1 else carried[0]
        return run

    def advance(self, tokens: int, per_epoch: int) -> None:
        """One batch done; after the epoch's last, the next epoch draws its batches from here."""
        self.batch, self.step, self.tokens = self.batch + 1, self.step + 1, self.tokens + tokens
        if self.batch == per_epoch:
            self.epoch, self.batch, self.epoch_rng, self.carried = self.epoch + 1, 0, self.rng.get_state(), None

    def save(self, config: TrainConfig, model: LanguageModel, vocab, optimizer: torch.optim.Optimizer,
             dist: Dist = Dist()) -> Optional[Path]:
        """Every process calls it (the carried state is gathered); rank 0 writes the checkpoint."""
        extra = {"batch_gen": self.epoch_rng, "torch_rng": torch.get_rng_state()}
        if self.carried is not None:
            carried = self.carried if isinstance(self.carried, tuple) else (self.carried,)
            carried = [dist.gather_rows(h, config.batch_size) for h in carried]  # (L, B, H): the whole batch's
            extra.update(zip(("state_h", "state_c"), carried))
        if not dist.main:
            return None
        progress = {k: getattr(self, k) for k in self.PROGRESS}
        return checkpoint.save(Path(config.out), model, vocab, config.to_dict(), progress, optimizer, extra)


@dataclass
class Meter:
    """Training loss, tokens and seconds since the last report."""

    loss: float = 0.0  # summed over tokens
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class Session:
    """What the steps of one run read: built once in :func:`_train`, passed whole to each step
    (``train_step(s, X, Y)``, ``report(s)``, ``stop(s, stopped)``). Plain fields, no methods: the
    loop stays in :func:`_train`, read top to bottom."""

    config: TrainConfig
    data: Dataset
    model: LanguageModel  # the model whose weights are saved
    net: torch.nn.Module  # what a step runs: the model, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    run: RunState  # where the run stands (saved in every checkpoint)
    per_epoch: int  # batches per epoch
    dist: Dist  # this process's rank among the run's processes
    on_epoch: Optional[Callable[[dict], None]] = None  # called with each report's metrics row
    started: float = 0.0  # time.perf_counter() at the run's clock zero (earlier sessions included)
    elapsed: float = 0.0  # the run's clock at the current batch, agreed by all ranks
    meter: Meter = field(default_factory=Meter)  # since the last report
    bar: Any = None  # the progress bar (rich), or a quiet stand-in
    bf16: bool = False  # the steps run under torch.autocast("cpu", dtype=torch.bfloat16) (--precision)


def train(config: TrainConfig, on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train as ``config`` says; return the last report's metrics ({} if the budget was spent already).

    ``on_epoch(row)`` is called after each report. The run directory is this process's while it
    trains (:func:`grulab.lm.rundir.claim`). Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and raises
    :class:`grulab.lm.signals.Stopped` (a KeyboardInterrupt); a NaN or infinite loss raises GrulabError
    and keeps the last good checkpoint.

    Under torchrun (a process group set up, see :mod:`grulab.lm.distributed`) every process runs this;
    each trains on its rows of every batch, and rank 0 alone claims the run directory, writes and prints.
    """
    dist = current()
    check_kernel_env()  # before anything is made in --out
    # beside a busy process, torch's ops around the GRU follow the thread governor too, unless
    # --threads fixed the count (grulab.kernels.threads.steer_torch)
    with claimed(config, dist), threads.steering(not config.threads):
        return _train(with_absolute_corpus(config), on_epoch, dist)


@contextmanager
def claimed(config: TrainConfig, dist: Dist) -> Iterator[None]:
    """The run directory, claimed by rank 0 (:func:`grulab.lm.rundir.claim`); every rank learns whether it could."""
    claim, error = None, None
    if dist.main:
        try:
            claim = rundir.claim(Path(config.out), resume=config.resume, overwrite=config.overwrite)
        except GrulabError as e:
            error = e
    if dist.max(float(error is not None))[0]:
        raise error or GrulabError(f"rank 0 could not claim --out {config.out} (its message says why)")
    if claim is None:
        yield
        return
    with claim:
        if not config.resume:
            mark_job(Path(config.out))  # under torchrun: its restarts resume this run
        try:
            yield
        except BaseException:
            out = Path(config.out)
            if not config.resume and not any((out / name).exists() for name in rundir.CHECKPOINTS):
                # it ended before its first checkpoint: leave --out as it was, for the next command
                claim.abandon((METRICS, MARKER))
            raise


def check_kernel_env() -> None:
    """GRULAB_KERNEL names a kernel (grulab.kernels.forced), said in one line before anything starts."""
    try:
        kernels.forced()
    except ValueError as e:
        raise UsageError(f"{e}; fix or unset {kernels.ENV}") from None


def _train(config: TrainConfig, on_epoch: Optional[Callable[[dict], None]], dist: Dist) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    resumed = checkpoint.load(config.out, with_training_state=True) if config.resume else None
    if resumed is not None and dist.main:
        checkpoint.trim_metrics(Path(config.out), resumed)  # rows written after that save: their training is redone
    torch.manual_seed(config.seed)
    data, per_epoch = load_data(config, resumed, dist)
    model = resumed_model(config, resumed) if resumed else LanguageModel(config.model_config(len(data.vocab)))
    model.train()
    native.load()  # the kernel is ready (built at install, else now) before the clock starts
    with talking():  # DDP broadcasts rank 0's weights, then averages the gradients at each backward
        net = model if dist.world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(config, model, resumed)
    run = RunState.restore(resumed, config.seed, dist) if resumed else RunState.start(config.seed, dist)
    ran = precision(config, model, dist)  # ("fp32" or "bf16", why); auto times both (off the run's clock)
    if dist.main:
        start_metrics(config, fresh=resumed is None)
        log_start(config, data, model, per_epoch, resumed_at=run.epoch + 1 if resumed else None, precision=ran,
                  dist=dist)
    s = Session(config, data, model, net, optimizer, run, per_epoch, dist, on_epoch,
                started=time.perf_counter() - run.elapsed, bf16=ran[0] == "bf16")
    last, saved = {}, run.elapsed  # saved: on the run's clock (agreed by all ranks), the last checkpoint's time
    with progress_bar(config, per_epoch, dist) as s.bar, StopOnSignal() as interrupt:
        for X, Y in remaining_batches(config, data, run):
            # every rank decides alike (one all_reduce): stop at the same batch, the same clock for the schedule
            requested, s.elapsed = dist.max(float(interrupt.requested), time.perf_counter() - s.started)
            if requested:  # Ctrl-C, SIGTERM, SIGHUP: stop between batches, where the state is consistent
                stop(s, interrupt.interrupt())
            if config.max_minutes and s.elapsed >= config.max_minutes * 60:
                break  # the time budget is spent
            loss = train_step(s, X, Y)
            s.bar.update(s.bar.task_ids[0], completed=run.batch or per_epoch, epoch=run.epoch + (run.batch > 0),
                         loss=loss, rate=f"{s.meter.tokens / max(s.meter.seconds, 1e-9):,.0f} tok/s")  # all processes
            if run.batch == 0 or (config.eval_every and run.step % config.eval_every == 0):
                last, saved = report(s), s.elapsed
            elif config.checkpoint_every_minutes and s.elapsed - saved >= config.checkpoint_every_minutes * 60:
                run.elapsed = saved = s.elapsed  # a timed save: no report, no metrics row
                run.save(config, model, data.vocab, optimizer, dist)
        if s.meter.tokens:  # the time budget ended the run inside an epoch
            last = report(s)
    if not last:
        if dist.main:
            _log(f"nothing to train: the run's budget ({config.epochs or '-'} epochs, {config.max_minutes:g} "
                 f"minutes) is used up; give a larger --epochs or --max-minutes")
        return last
    if dist.main:
        plots.perplexity_curve(read_metrics(Path(config.out) / METRICS), Path(config.out) / "perplexity.png")
    return last


# ---------------------------------------------------------------------------- the steps of train()
def with_absolute_corpus(config: TrainConfig) -> TrainConfig:
    """``config`` with a corpus file's path made absolute (a bundled name stays a name), so that the
    checkpoint's config resumes from any working directory."""
    if config.corpus in CORPORA:
        return config
    return replace(config, corpus=str(Path(config.corpus).expanduser().absolute()))


def load_data(config: TrainConfig, resumed: Optional[checkpoint.Checkpoint], dist: Dist = Dist()) -> tuple[Dataset, int]:
    """The corpus as token ids, and the number of batches per epoch."""
    if config.batch_size < dist.world:
        raise GrulabError(f"--batch-size {config.batch_size} is smaller than the {dist.world} processes: each needs "
                          "at least one row of every batch (--batch-size is the global batch); raise --batch-size")
    data = build_dataset(config.corpus, config.level, config.min_freq, config.d2l_text, config.val_fraction,
                         config.max_tokens)
    if resumed is not None and resumed.vocab != data.vocab:
        raise GrulabError(f"the corpus {config.corpus!r} no longer gives the vocabulary saved in {resumed.path}; "
                          "resume with the same corpus or start a new run in another --out")
    per_epoch = num_batches(len(data.train_ids), config.batch_size, config.num_steps, config.sampling)
    if per_epoch < 1:
        need = min_tokens(config.batch_size, config.num_steps, config.sampling)
        raise GrulabError(f"corpus {config.corpus!r} is too short for one batch: {len(data.train_ids):,} training "
                          f"tokens, {need:,} needed; lower --batch-size or --num-steps, or use a longer text")
    return data, per_epoch


def resumed_model(config: TrainConfig, resumed: checkpoint.Checkpoint) -> LanguageModel:
    if resumed.model.config != config.model_config(resumed.model.config.vocab_size):
        raise GrulabError(f"the model in {resumed.path} is not the one this config describes; "
                          "build the config with grulab.lm.train.resume_config(out)")
    return resumed.model


def make_optimizer(config: TrainConfig, model: LanguageModel,
                   resumed: Optional[checkpoint.Checkpoint]) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters, with its saved state on resume."""
    optimizer = OPTIMIZERS[config.optimizer]([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    if resumed is not None and resumed.optimizer is not None:
        optimizer.load_state_dict(resumed.optimizer)
    return optimizer


def start_metrics(config: TrainConfig, fresh: bool) -> None:
    """The run directory, with an empty metrics.jsonl for a new run (a resumed one appends)."""
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if fresh:
        (Path(config.out) / METRICS).write_text("")


AUTO_GAIN = 1.05  # --precision auto: bf16 steps must take this much less time than fp32's to be chosen


def precision(config: TrainConfig, model: LanguageModel, dist: Dist = Dist()) -> tuple[str, str]:
    """(the precision the steps run in, "fp32" or "bf16"; why), from --precision and the CPU; for
    ``auto`` on a CPU with bf16 units, from the steps of ``model`` timed both ways (bf16_gain)."""
    has = kernels.has_bf16_units()
    if config.precision == "fp32":
        return "fp32", "--precision fp32"
    if config.precision == "bf16":
        return "bf16", "--precision bf16" + ("" if has else "; this CPU has no bf16 units, so the GRU runs "
                                             "float32 and only the output layer bf16")
    if not has:
        return "fp32", "--precision auto: this CPU has no bf16 units"
    gain, = dist.max(bf16_gain(config, model, dist))  # every rank decides alike
    if gain >= AUTO_GAIN:
        return "bf16", f"--precision auto: this CPU has bf16 units (AVX512-BF16); bf16 steps measured {gain:.2f}x fp32's"
    return "fp32", (f"--precision auto: this CPU has bf16 units, but bf16 steps measured {gain:.2f}x fp32's "
                    f"here (under {AUTO_GAIN}x)")


def bf16_gain(config: TrainConfig, model: LanguageModel, dist: Dist = Dist()) -> float:
    """fp32 step time over bf16 step time: forward, loss and backward of one batch of this process's
    shape on random tokens, interleaved, the best of at least 3 rounds after a warm-up of each (which
    is where impl="auto" measures its kernels for both). Weights, gradients and the random state are
    left as they were."""
    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(X, None)  # (b, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), X.flatten())
        torch.autograd.grad(loss, params)
        return time.perf_counter() - t0

    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        X = torch.randint(model.config.vocab_size, (config.batch_size, config.num_steps),
                          generator=torch.Generator().manual_seed(0))[dist.rows(config.batch_size)]  # (b, T)
        for bf16 in (False, True):
            step(bf16)
        times: dict[bool, list[float]] = {False: [], True: []}
        start = time.perf_counter()
        while len(times[True]) < 3 or len(times[True]) < 9 and time.perf_counter() - start < 1.0:
            for bf16 in (False, True):
                times[bf16].append(step(bf16))
    return min(times[False]) / min(times[True])


def log_start(config: TrainConfig, data: Dataset, model: LanguageModel, per_epoch: int,
              resumed_at: Optional[int], precision: tuple[str, str], dist: Dist = Dist()) -> None:
    from grulab.lm.distributed import threads_note

    split = f", {dist.world} processes" if dist.world > 1 else ""
    ran, why = precision  # precision(): what the steps run in, and why
    cleaned = {None: "", "letters": ", letters only as the d2l PyTorch notes",
               "newlines": ", newlines as spaces as the d2l MXNet notes"}[data.rule]
    _log(f"grulab train: {config.corpus} ({len(data.train_ids):,} train / {len(data.val_ids):,} val "
         f"{config.level} tokens, vocab {len(data.vocab)}{cleaned}), {model.config.describe()}, "
         f"{count_parameters(model):,} parameters, {per_epoch} batches of {config.batch_size}×{config.num_steps} "
         f"per epoch{split}, {threads_note(config.threads)}, precision {ran} ({why})"
         + (f", resumed at epoch {resumed_at}" if resumed_at else ""))


def progress_bar(config: TrainConfig, per_epoch: int, dist: Dist = Dist()):
    """A rich progress bar over the batches of the current epoch (hidden with --no-progress, and on ranks > 0)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                   disable=not (config.progress and dist.main),
                   transient=True)
    bar.add_task("train", total=per_epoch, epoch=1, loss=float("nan"), rate="")
    return bar


def remaining_batches(config: TrainConfig, data: Dataset, run: RunState) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches (X, Y), each (B, T), from where the run stands to the last epoch (endless without
    --epochs). Each epoch's batches come from the sampler's RNG state at that epoch's start, so a
    resumed run gets the very batches it would have had."""
    sample = SAMPLERS[config.sampling]
    while not config.epochs or run.epoch < config.epochs:
        run.rng.set_state(run.epoch_rng)
        done = run.batch  # resuming inside an epoch: these were trained on
        for i, (X, Y) in enumerate(sample(data.train_ids, config.batch_size, config.num_steps, run.rng)):
            if i >= done:
                yield X, Y


def train_step(s: Session, X: Tensor, Y: Tensor) -> float:
    """One batch: forward, loss, backward, clip, update; then advance the run. Returns the batch's mean loss.

    ``X``, ``Y`` are the whole (global) batch; this process trains on its rows. ``s.net`` may be
    the model wrapped in DistributedDataParallel, which averages the gradients over the processes.
    """
    config, optimizer, run, meter, dist = s.config, s.optimizer, s.run, s.meter, s.dist
    t0 = time.perf_counter()
    rows = dist.rows(config.batch_size)
    X, Y = X[rows], Y[rows]  # (b, T): this process's block of rows
    state = detach_state(run.carried) if config.sampling == "sequential" else None  # random batches: fresh
    for group in optimizer.param_groups:
        group["lr"] = lr_at(config, budget_progress(config, run, s.per_epoch, s.elapsed))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16):  # --precision bf16: mixed precision
        logits, state = s.net(X, state)  # (b, T, V)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="sum")  # float32 under autocast
    tokens = config.batch_size * config.num_steps  # in the global batch
    total, = dist.sum(loss_sum.item())
    if not math.isfinite(total):
        raise diverged(config, f"epoch {run.epoch + 1}, batch {run.batch + 1}", f"the loss is {total / tokens}")
    optimizer.zero_grad(set_to_none=True)
    with talking():  # DDP averages the gradients over the processes during the backward,
        # so this is the global batch's mean loss (or, --loss sum, its sum)
        (loss_sum * dist.world / (tokens if config.loss == "mean" else 1)).backward()
    if config.clip > 0:  # the same averaged gradients on every rank, so the same clipping
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], config.clip)
    optimizer.step()
    run.carried = detach_state(state)
    run.advance(tokens, s.per_epoch)
    meter.loss, meter.tokens = meter.loss + total, meter.tokens + tokens
    meter.seconds += time.perf_counter() - t0
    return total / tokens


def report(s: Session) -> dict:
    """Evaluate; stop if training diverged; save the checkpoint; log a metrics line and predictions.

    Every process evaluates its share of the validation text; rank 0 alone writes and prints."""
    from grulab.lm.generate import predict  # generation imports the model; keep train importable alone

    config, data, model, optimizer, run, meter, dist = s.config, s.data, s.model, s.optimizer, s.run, s.meter, s.dist
    started, per_epoch, bar = s.started, s.per_epoch, s.bar
    run.elapsed = time.perf_counter() - started
    validated = len(data.val_ids) > 1  # --val-fraction 0 (or a tail too short to predict): training only
    val_nll = evaluate(model, data.val_ids, 32, config.num_steps, dist)[0] if validated else math.nan
    row = dict(epoch=round(run.epoch + run.batch / per_epoch, 4), step=run.step, tokens=run.tokens,
               train_ppl=perplexity(meter.loss / max(meter.tokens, 1)), val_ppl=perplexity(val_nll) if validated else None,
               tokens_per_s=meter.tokens / max(meter.seconds, 1e-9), elapsed=run.elapsed,
               lr=optimizer.param_groups[0]["lr"])
    if math.isinf(row["train_ppl"]) or (validated and not math.isfinite(row["val_ppl"])):
        raise diverged(config, f"epoch {row['epoch']:.2f}",
                       f"the perplexity is {row['train_ppl']} (train), {row['val_ppl']} (val)")
    meter.loss, meter.tokens, meter.seconds = 0.0, 0, 0.0
    if not dist.main:
        run.save(config, model, data.vocab, optimizer, dist)  # gives rank 0 its rows of the carried state
        return row
    # the row goes first: the checkpoint records how much of metrics.jsonl is its own
    checkpoint.append_metrics(Path(config.out), row)
    run.save(config, model, data.vocab, optimizer, dist)
    val = f"val ppl {row['val_ppl']:.3f}  " if validated else ""
    bar.console.print(f"epoch {row['epoch']:.2f}  train ppl {row['train_ppl']:.3f}  {val}"
                      f"{row['tokens_per_s']:,.0f} tok/s  lr {row['lr']:.2e}  {row['elapsed']:.0f}s", highlight=False)
    prefixes = config.prefixes or [data.vocab.decode(data.val_ids[:8] if len(data.val_ids) >= 8 else data.train_ids[:8])]
    for p in prefixes:
        bar.console.print(f"  {predict(model, data.vocab, p, config.predict_length)!r}", highlight=False, markup=False)
    if s.on_epoch is not None:
        s.on_epoch(row)
    return row


def stop(s: Session, stopped: Stopped) -> None:
    """Ctrl-C, SIGTERM or SIGHUP (on any process): save where the run stands and raise ``stopped``."""
    config, run = s.config, s.run
    run.elapsed = s.elapsed
    run.save(config, s.model, s.data.vocab, s.optimizer, s.dist)
    s.bar.stop()
    if s.dist.main:
        _log(f"interrupted at epoch {run.epoch + 1}, batch {run.batch}: checkpoint saved to "
             f"{Path(config.out) / checkpoint.CHECKPOINT}; continue with: grulab train --resume --out {config.out}")
    raise stopped


def diverged(config: TrainConfig, where: str, what: str) -> GrulabError:
    out = Path(config.out)
    kept = checkpoint.find(out) if (out / checkpoint.CHECKPOINT).exists() else None
    return GrulabError(f"training diverged at {where}: {what}; "
                       + (f"the last good checkpoint is kept in {kept}; " if kept else "no checkpoint was saved; ")
                       + "lower --lr or set --clip")


# ---------------------------------------------------------------------------- helpers
@torch.no_grad()
def evaluate(model: LanguageModel, ids: torch.Tensor, batch_size: int = 32, num_steps: int = 64,
             dist: Dist = Dist()) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/token) of ``ids`` under the model, and the token count.

    The text is laid out as up to ``batch_size`` contiguous rows and read
    ``num_steps`` at a time with the state carried, so every token but the
    first of each row is predicted from all the text before it in its row.
    Under torchrun each process reads its block of the rows and the sums are
    added up, weighted by tokens: every process gets the whole text's value.
    """
    n = len(ids) - 1
    if n < 1:
        return float("nan"), 0
    was_training = model.training
    model.eval()
    rows = max(1, min(batch_size, n // max(num_steps, 1)))
    length = n // rows
    mine = dist.rows(rows) if rows >= dist.world else slice(dist.rank, dist.rank + 1)  # few rows: one each
    xs = ids[: rows * length].view(rows, length)[mine]  # (r, L)
    ys = ids[1 : rows * length + 1].view(rows, length)[mine]  # (r, L)
    state, total = None, 0.0
    for start in range(0, length if len(xs) else 0, num_steps):
        logits, state = model(xs[:, start : start + num_steps], state)  # (r, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), ys[:, start : start + num_steps].flatten(), reduction="sum").item()
    model.train(was_training)
    total, count = dist.sum(total, ys.numel())
    return total / count, int(count)


def perplexity(nll: float) -> float:
    """exp(mean negative log-likelihood), inf past float range."""
    return math.exp(nll) if nll < 709 else math.inf


def budget_progress(config: TrainConfig, run: RunState, per_epoch: int, elapsed: float) -> float:
    """How far through the budget: by steps when --epochs is set (so a seeded run is reproducible),
    else by wall time."""
    if config.epochs:
        return min(1.0, run.step / (config.epochs * per_epoch))
    return min(1.0, elapsed / (config.max_minutes * 60))


def lr_at(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` ∈ [0, 1] of the budget."""
    if config.schedule == "constant":
        return config.lr
    warmup = 0.02
    if progress < warmup:
        return config.lr * (0.1 + 0.9 * progress / warmup)
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _log(msg: str) -> None:
    print(msg, flush=True)
