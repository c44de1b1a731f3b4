"""What a training run is told: :class:`TrainConfig` (every flag of ``grulab train``, with its
default, check and help in one place) and the presets of the notes (``--preset d2l``, ``d2l-zh``).

Kept apart from :mod:`grulab.lm.train` so that a checkpoint can check a saved config without
importing the training loop (which imports the checkpoint module).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from grulab.errors import ConfigError, GrulabError
from grulab.lm.config import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, option, up_to
from grulab.lm.data import CORPORA, LEVELS, SAMPLERS, load_corpus, notes_rule
from grulab.lm.model import ModelArgs, ModelConfig

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULES = ("cosine", "constant")
LOSSES = ("mean", "sum")
PRECISIONS = ("fp32", "bf16", "auto")
# Adam's float32 step, lr / (1 - beta1), overflows past ~3e37
LEARNING_RATE = up_to(POSITIVE, 1e30)


@dataclass
class TrainConfig(ModelArgs):
    """A training run: the model's fields (from :class:`ModelArgs`), then the data, batches,
    optimisation, budget and reporting. ``grulab train`` has one flag per field."""

    # data
    corpus: str = option("austen", f"a bundled corpus name ({', '.join(CORPORA)}) or the path of a UTF-8 text file")
    level: str = option("char", "tokens: characters, or words and punctuation", choices=LEVELS)
    min_freq: int = option(0, "tokens seen fewer times become <unk>", rule=COUNT)
    d2l_text: bool = option(False, "clean the text as the notes do, by the corpus' script: Latin text as the d2l "
                            "PyTorch notes clean the Time Machine (lower case, letters A-Z only), any other (Chinese) "
                            "as the d2l MXNet notes clean their lyrics (newlines become spaces)")
    val_fraction: float = option(0.1, "the tail of the corpus held out for validation; 0 = none: the reports "
                                 "show training perplexity only, and divergence is judged on the training loss",
                                 rule=FRACTION)
    max_tokens: int = option(0, "train on the first N tokens only (0 = all); d2l's load_data_time_machine "
                             "uses 10000", rule=COUNT)
    # batches
    batch_size: int = option(64, "sequences per batch", rule=POSITIVE_INT)
    num_steps: int = option(64, "time steps per sequence (truncated BPTT length)", rule=POSITIVE_INT)
    sampling: str = option("sequential", "sequential (state carried, detached) or random (state reset)",
                           choices=SAMPLERS)
    # optimisation
    optimizer: str = option("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = option(3e-3, "peak learning rate", rule=LEARNING_RATE)
    schedule: str = option("cosine", "cosine (warm-up, then decay to lr/10 over the budget) or constant",
                           choices=SCHEDULES)
    clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", rule=NON_NEGATIVE)
    loss: str = option("mean", "the loss the gradient is taken of: the mean over the batch's tokens, or their sum, "
                       "as in the d2l MXNet notes (loss.backward() on the per-token losses): a gradient batch size × "
                       "num steps times larger, which --clip and --lr then act on", choices=LOSSES)
    precision: str = option("fp32", "the training steps' arithmetic: fp32; bf16 (torch.autocast: the GRU's and the "
                            "output layer's products in bf16, the state, gates and master weights float32; the "
                            "checkpoint stays float32); auto: bf16 where this CPU has bf16 units (AVX512-BF16, AMX) "
                            "and a training step of this run's shape measured faster in bf16 (timed before the "
                            "run), else fp32. Evaluation runs float32", choices=PRECISIONS, resumable=True)
    # budget: training stops at whichever ends first
    epochs: int = option(0, "passes over the training text (0 = until --max-minutes); with both, whichever "
                         "ends first", rule=COUNT, resumable=True)
    max_minutes: float = option(3.0, "wall-clock budget in minutes (0 = until --epochs); with both, whichever "
                                "ends first", rule=NON_NEGATIVE, resumable=True)
    # run
    seed: int = option(0, "seeds the model init, the batches and dropout", rule=SEED)
    out: str = option("runs/latest", "run directory: checkpoint/, metrics.jsonl, perplexity.png; one run at a "
                      "time, and a new run into one that holds a run is refused: continue it (grulab train --resume) "
                      "or replace it (--overwrite)")
    resume: bool = option(False, "continue the run in --out where it stopped")
    overwrite: bool = option(False, "replace the run already in --out (its checkpoint and metrics are deleted)")
    checkpoint_every_minutes: float = option(
        5.0, "also save a checkpoint after this many minutes without one, so that a hard kill (kill -9, power) "
        "loses at most that much; Ctrl-C, SIGTERM and SIGHUP save at once (0 = at reports only)",
        rule=NON_NEGATIVE, resumable=True)
    prefixes: list[str] = option([], "continued at every report", flag="--prefix",
                                 default_help="the first 8 tokens of the validation text", resumable=True)
    predict_length: int = option(60, "tokens predicted per prefix", rule=COUNT, resumable=True)
    eval_every: int = option(0, "also evaluate every N batches (0 = at the end of each epoch only)", rule=COUNT,
                             resumable=True)
    progress: bool = option(True, "show a progress bar", resumable=True)
    # processes (torchrun): --batch-size is the global batch, split across the processes
    threads: int = option(0, "compute threads per process (0 = PyTorch's default, or OMP_NUM_THREADS, which "
                          "torchrun sets to 1 when it starts several processes; lowered while another process "
                          "keeps a core busy)", rule=up_to(COUNT, 4096), resumable=True)
    timeout: float = option(300.0, "seconds a process waits for the others (runs under torchrun) before the run "
                            "ends with an error", rule=up_to(POSITIVE, 86400), resumable=True)

    def check(self) -> None:
        super().check()
        if self.epochs == 0 and self.max_minutes == 0:
            raise ConfigError("epochs", "> 0 when max_minutes is 0 (give the run a budget)", 0)
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "left out with --resume (continue the run, or replace it)", True)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **{f.name: getattr(self, f.name) for f in fields(ModelArgs)})


@dataclass(frozen=True)
class Preset:
    help: str  # what the preset is, for --help
    values: dict  # the TrainConfig fields it sets


#: The notes' prefixes by the rule that fits the corpus' script (grulab.lm.data.notes_rule): the d2l
#: PyTorch notes' for Latin text, the d2l MXNet notes' for Chinese (and any other script).
NOTES_PREFIXES = {"letters": ["time traveller", "traveller"], "newlines": ["分开", "不分开", "战争中部队"]}

PRESETS: dict[str, Preset] = {
    # The d2l PyTorch notes: d2l's get_params and train_ch8(model, train_iter, vocab, lr=1, num_epochs=500)
    # on load_data_time_machine(32, 35) (sequential batches, the first 10,000 characters).
    "d2l": Preset("the d2l PyTorch notes' scratch GRU (their corpus: --corpus timemachine)", dict(
        cell="gru", reset_after=False, init="d2l", hidden=256, layers=1, embed=0, dropout=0.0,
        level="char", d2l_text=True, max_tokens=10000, batch_size=32, num_steps=35, sampling="sequential",
        optimizer="sgd", lr=1.0, loss="mean", schedule="constant", clip=1.0, epochs=500, max_minutes=0.0,
        prefixes=NOTES_PREFIXES["letters"], predict_length=50)),
    # The d2l MXNet notes: their get_params (N(0, 0.01²) weights, one zero bias per gate), gru_rnn
    # (R multiplies H W_hh after the product: PyTorch's reset-after form with b_hn = 0, which --init d2l
    # holds at zero) and utils.train_and_predict_rnn(is_random_iter=False, epochs=200, num_steps=35,
    # hidden_dim=256, learning_rate=0.2, clipping_norm=5, batch_size=32, pred_len=100) on the first
    # 20,000 characters of their lyrics, whose gradient is the summed loss's (loss.backward() on a vector).
    "d2l-zh": Preset("the d2l MXNet notes' scratch GRU (their corpus, Chinese lyrics, is not bundled: any Chinese "
                     "text, tang300 by default)", dict(
        corpus="tang300", cell="gru", reset_after=True, init="d2l", hidden=256, layers=1, embed=0, dropout=0.0,
        level="char", d2l_text=True, max_tokens=20000, batch_size=32, num_steps=35, sampling="sequential",
        optimizer="sgd", lr=0.2, loss="sum", schedule="constant", clip=5.0, epochs=200, max_minutes=0.0,
        prefixes=NOTES_PREFIXES["newlines"], predict_length=100)),
}


def with_preset(config: TrainConfig, preset: Optional[str], given: Optional[dict] = None) -> TrainConfig:
    """``config`` with the preset's values, then the ``given`` ones (the flags typed: they win).

    A preset's prefixes are its notes' own; on a corpus of the other script (the d2l preset on
    Chinese text, d2l-zh on English) the other notes' prefixes, which fit it, take their place,
    unless ``given`` has prefixes. That reads the corpus.
    """
    given = dict(given or {})
    if preset is None:
        return replace(config, **given)
    if preset not in PRESETS:
        raise GrulabError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    values = {k: list(v) if isinstance(v, list) else v for k, v in PRESETS[preset].values.items()}
    config = replace(config, **{**values, **given})
    if "prefixes" not in given and config.prefixes in NOTES_PREFIXES.values():
        config = replace(config, prefixes=list(NOTES_PREFIXES[notes_rule(load_corpus(config.corpus))]))
    return config
