"""The ``grulab`` command: train, generate, eval, compare, viz, demo, kernels, and (with the
``export`` extra) export and ``generate --onnx`` (:mod:`grulab.deploy.onnx_cli`).

The top layer of the package: each command imports what it needs when it runs, so that
``grulab --help`` starts without torch. Training flags come from
:class:`grulab.lm.settings.TrainConfig`: one dashed flag
per field, with its help text, choices and default read from the field
(:func:`grulab.lm.config.option`), so the two never drift apart. Library errors
name parameters ("hidden must be ..."); the CLI tells them as flags. Bad input
ends in one line on stderr and a non-zero exit (2 for usage, 1 otherwise),
never a traceback; so does a bad value of an environment variable grulab reads,
checked before any command runs (:func:`check_environment`). A mistyped command,
flag or choice gets the nearest valid one suggested.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import shlex
import sys
import warnings
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional, Sequence

from grulab.lm.config import flag
from grulab.errors import ConfigError, GrulabError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help (main() puts "grulab: error: "
    before it, once), and a mistyped command, choice or flag gets the nearest valid one suggested, as
    Python 3.14's ``suggest_on_error`` does."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def _check_value(self, action, value):
        if action.choices is None or value in action.choices:
            return
        choices = [str(c) for c in action.choices]
        close = difflib.get_close_matches(str(value), choices, n=1)
        if isinstance(action, argparse._SubParsersAction):
            raise UsageError(f"unknown command {value!r}; did you mean {close[0]!r}?" if close else
                             f"unknown command {value!r}; the commands are {', '.join(choices)} "
                             f"(see {self.prog} --help)")
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise argparse.ArgumentError(action, f"invalid choice {value!r}{hint} (choose from {', '.join(choices)})")

    def parse_args(self, args=None, namespace=None):
        first = list(sys.argv[1:] if args is None else args)[:1]
        if first and first[0].startswith("-") and self._subparsers is not None:  # `grulab --verison`
            head = first[0].split("=", 1)[0]
            if not any(o.startswith(head) for a in self._actions for o in a.option_strings):
                self._unknown(argparse.Namespace(), first)
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self._unknown(namespace, extras)
        return namespace

    def _unknown(self, namespace: argparse.Namespace, extras: list[str]):
        """The words no command took: the first flag among them, with the nearest flag of its command."""
        parser = self
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(namespace, "command", None) in action.choices:
                parser = action.choices[namespace.command]
        flags = [a for a in extras if a.startswith("-") and a != "-"]
        if not flags:
            parser.error(f"unexpected argument{'s' * (len(extras) > 1)}: {' '.join(extras)}")
        name = flags[0].split("=", 1)[0]
        known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(name, known, n=1)
        where = f" for {parser.prog.removeprefix(self.prog).strip()}" if parser is not self else ""
        parser.error(f"unknown flag {name}{where}" + (f"; did you mean {close[0]}?" if close else ""))


class _Switch(argparse.BooleanOptionalAction):
    """A boolean flag with its ``--no-`` form (``--d2l-text`` / ``--no-d2l-text``), so that a value a
    preset turned on can be turned off again.

    ``sets`` is the value the flag itself gives: False for a flag named after the off state of its
    field (``--reset-before`` sets ``reset_after`` to False; ``--no-reset-before`` sets it to True).
    The help shows the default as on or off, the flag's own state.
    """

    def __init__(self, option_strings, dest, default=None, sets: bool = True, help=None, **kwargs):
        if help is not None and default is not None and default is not argparse.SUPPRESS:
            help += f" (default: {'on' if default == sets else 'off'})"
        # SUPPRESS here: BooleanOptionalAction would add "(default: False)" to the help on some Pythons
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=help, **kwargs)
        self.default, self.sets = default, sets

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            setattr(namespace, self.dest, self.sets != option_string.startswith("--no-"))


def _switch_flag(f) -> tuple[str, bool]:
    """The positive flag of a boolean config field and the value it sets: ``--progress`` (True) for a
    field whose flag is written ``--no-progress``, ``--reset-before`` (False) for ``reset_after``."""
    name = flag(f)
    if name.startswith("--no-"):
        return "--" + name[len("--no-"):], True
    if f.metadata.get("flag") is None:
        return name, True
    return name, not f.default  # a flag named after the other state: it flips the field's default


def _add_config_flags(parser: argparse.ArgumentParser, defaults: dict, skip: Sequence[str] = ()) -> None:
    """One flag per TrainConfig field, its help, choices and shown default read from the field.

    ``defaults`` are the command's own defaults for some fields (compare's shorter runs); the
    command builds its config from the same dict (see :func:`config_from_args`). Flags not given
    stay out of the namespace (SUPPRESS), so a preset's values are overridden only by what the
    user typed.
    """
    from grulab.lm.model import ModelArgs
    from grulab.lm.train import TrainConfig

    shown = replace(TrainConfig(), **defaults)
    model_fields = {f.name for f in fields(ModelArgs)}
    groups = {True: parser.add_argument_group("model"), False: parser.add_argument_group("training")}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        meta, default = f.metadata, getattr(shown, f.name)
        group = groups[f.name in model_fields]
        common = dict(dest=f.name, default=argparse.SUPPRESS)
        text = meta["help"].replace("%", "%%")
        if isinstance(default, bool):  # --flag and --no-flag: a preset's value can be turned either way
            name, sets = _switch_flag(f)
            text = meta["flag_help"] if not sets and meta["flag_help"] else meta["help"]
            group.add_argument(name, action=_Switch, sets=sets, dest=f.name, default=argparse.SUPPRESS,
                               help=f"{text} (default: {'on' if default == sets else 'off'})".replace("%", "%%"))
            continue
        text += f" (default: {meta['default_help'] or default})"
        if isinstance(default, list):
            group.add_argument(flag(f), nargs="+", metavar="TEXT", help=text, **common)
        elif meta["choices"] is not None:
            group.add_argument(flag(f), choices=list(meta["choices"]), help=text, **common)
        else:
            group.add_argument(flag(f), type=type(default), metavar=f.name.upper().split("_")[-1], help=text, **common)


def _given(args: argparse.Namespace, cls) -> dict:
    """The config fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


@contextmanager
def _flag_errors():
    """An error that names a config parameter ("hidden must be ..."), told as the flag ("--hidden must be ...")."""
    from grulab.lm.train import TrainConfig

    try:
        yield
    except ConfigError as e:
        flags = {f.name: flag(f) for f in fields(TrainConfig)}
        name = flags.get(e.name, "--" + e.name.replace("_", "-"))
        raise UsageError(f"{name} must be {e.want}, got {e.value!r}") from None


def config_from_args(args: argparse.Namespace):
    """The TrainConfig a ``train`` or ``compare`` command line asks for: the command's defaults,
    then ``--preset``, then the flags given."""
    from grulab.lm.train import TrainConfig, with_preset

    with _flag_errors():
        return with_preset(replace(TrainConfig(), **args.config_defaults), getattr(args, "preset", None),
                           _given(args, TrainConfig))


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from grulab.lm import distributed
    from grulab.lm.train import TrainConfig, resume_config

    if args.nproc < 1:
        raise UsageError(f"--nproc must be a positive integer, got {args.nproc}")
    if getattr(args, "resume", False):
        if args.preset:
            raise UsageError("--preset cannot change on --resume: the run keeps its settings")
        given = _given(args, TrainConfig)
        del given["resume"]
        with _flag_errors():
            config = resume_config(given.pop("out", TrainConfig().out), **given)
    else:
        config = config_from_args(args)
    if args.nproc > 1 and not distributed.under_torchrun():  # one machine, N processes: torchrun does the rest
        code = distributed.launch(args.nproc, _without_nproc(args.argv))
        return 128 - code if code < 0 else code
    dist = distributed.setup(config.timeout)
    try:
        last = _train_elastic(config, dist)
    finally:
        distributed.teardown()
    if last and dist.main:
        val = f"val perplexity {last['val_ppl']:.3f}, " if last["val_ppl"] is not None else ""
        print(f"done: {val}train perplexity {last['train_ppl']:.3f}, checkpoint in {Path(config.out) / 'checkpoint'}")
    return 0


def _train_elastic(config, dist) -> dict:
    """train(config); a torchrun restart of the job that started the run (``--max-restarts``) resumes
    it from its checkpoint (or starts it again, if it died before its first one)."""
    from grulab.lm import checkpoint, distributed
    from grulab.lm.train import train

    out = Path(config.out)
    again = distributed.restarted(out, dist)
    resume = again and dist.max(float(dist.main and (out / checkpoint.CHECKPOINT).exists()))[0]
    if again and not config.resume:
        if dist.main:
            print(f"grulab: restarted by torchrun: {'resuming' if resume else 'starting again'} the run in {out}",
                  flush=True)
        config = replace(config, resume=bool(resume), overwrite=not resume)
    try:
        return train(config)
    except distributed.LostPeer as e:
        raise distributed.LostPeer(f"{e}; the last checkpoint in {out} is intact: continue with --resume") from None


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line with --nproc N taken out (torchrun's workers run the rest)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from grulab.lm import checkpoint
    from grulab.lm.generate import check_sampling, generate

    with _flag_errors():
        check_sampling(args.length, args.temperature, args.top_k, args.top_p, args.seed)
    ckpt = checkpoint.load(Path(args.dir), note_live=True)
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    prefix = args.prefix if args.prefix is not None else "\n"
    sys.stdout.write(prefix)
    for piece in generate(ckpt.model, ckpt.vocab, prefix, args.length, args.temperature, args.top_k,
                          args.top_p, gen):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from grulab.lm import checkpoint
    from grulab.lm.data import encode_warning, load_corpus, tokenize
    from grulab.lm.train import evaluate
    from grulab.lm.validate import finite_perplexity

    ckpt = checkpoint.load(Path(args.dir), note_live=True)
    text = _as_trained(ckpt, load_corpus(args.textfile))
    tokens = tokenize(text, ckpt.vocab.level)
    ids = torch.tensor(encode_warning(ckpt.vocab, tokens, args.textfile), dtype=torch.long)
    if len(tokens) < 2:
        raise GrulabError(f"{args.textfile} has {len(tokens)} token(s); evaluation needs at least 2")
    nll, n = evaluate(ckpt.model, ids, 32, int(ckpt.train.get("num_steps", 64)))
    result = {"perplexity": finite_perplexity(nll, args.textfile), "bits_per_token": nll / math.log(2), "tokens": n}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f}  bits/token {result['bits_per_token']:.4f}  "
              f"tokens {n:,}  ({ckpt.vocab.level} level, {args.textfile})")
    return 0


def _as_trained(ckpt, text: str) -> str:
    """``text`` cleaned as the model's training text was (--d2l-text): by the notes' rule that fits the
    script of the model's vocabulary, so that an English model reads any text with its letters-only rule."""
    if not ckpt.train.get("d2l_text"):
        return text
    from grulab.lm.data import NOTES_RULES, UNK, notes_rule

    return NOTES_RULES[notes_rule("".join(t for t in ckpt.vocab.idx_to_token if t != UNK))](text)


def cmd_viz(args: argparse.Namespace) -> int:
    from grulab.lm import checkpoint
    from grulab.views import viz
    from grulab.lm.data import load_corpus

    text = args.text if args.text is not None else load_corpus(args.file)
    ckpt = checkpoint.load(Path(args.dir), note_live=True)
    text = _as_trained(ckpt, text)
    path = viz.render(ckpt.model, ckpt.vocab, text, Path(args.out))
    print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from grulab.lm import compare

    base = config_from_args(args)
    with _flag_errors():
        runs = compare.configs(base, args.cells, args.sweep)
    compare.run(runs, Path(base.out), args.target_ppl, overwrite=base.overwrite)
    return 0


DEMO_MARK = ".grulab-demo"  # in a directory the austen demo trained in: the next demo may replace it


def cmd_demo(args: argparse.Namespace) -> int:
    from grulab.lm import rundir

    out = Path(args.out)
    if args.name == "cat-mouse":
        from grulab.views import catmouse

        with rundir.claim(out, run_files=()):  # one process at a time; it rewrites its own catmouse.png
            catmouse.run(out_dir=out)
        return 0
    from grulab.lm.generate import generate
    from grulab.lm.train import TrainConfig, train
    from grulab.lm import checkpoint

    held = [name for name in rundir.TRAIN_FILES if (out / name).exists()]
    if held and not (out / DEMO_MARK).exists():
        raise GrulabError(f"--out {out} holds a run that is not a demo's ({', '.join(held)}); the demo replaces only "
                          "its own earlier demo: give another --out")
    print(f"grulab demo: training a character-level GRU on Jane Austen for {args.minutes:g} minutes (Ctrl-C stops early)")
    config = TrainConfig(corpus="austen", max_minutes=args.minutes, out=str(out), overwrite=True,
                         prefixes=["Elizabeth ", "It is a truth "])
    rundir.make_dir(out)
    (out / DEMO_MARK).touch()
    train(config)
    ckpt = checkpoint.load(out)
    print("\nsample (temperature 0.7):\n")
    import torch

    prefix = "Elizabeth was "
    sys.stdout.write(prefix)
    for piece in generate(ckpt.model, ckpt.vocab, prefix, 300, 0.7, generator=torch.Generator().manual_seed(0)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(f"\n\nmore: grulab generate {out} --prefix 'Mr. Darcy' --length 400")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    import torch

    from grulab import kernels

    if args.forget:
        from grulab.kernels import autotune

        n, where = len(autotune.recorded()), autotune.path()
        autotune.forget()
        print(f"forgot {n} measured choice(s) ({where})" if n else f"no measured choices to forget ({where})")
    from grulab.kernels import plan

    dtype = getattr(torch, args.dtype)
    if args.shape is not None and args.device != "cpu":
        raise UsageError(f"--shape explains a CPU call; got --device {args.device}")
    try:
        if args.shape is not None:
            T, B, I, H = args.shape
            print(plan.format_plan(plan.plan(T, B, I, H, train=args.train, dtype=dtype,
                                             reset_after=not args.reset_before, autocast=args.autocast_bf16)))
        else:
            print(plan.report(kernels.Query(args.device, dtype, not args.reset_before, args.autocast_bf16)))
    except RuntimeError as e:  # GRULAB_KERNEL forces a kernel that cannot run this query (kernels._select)
        if f"{kernels.ENV}=" not in str(e):
            raise
        raise UsageError(str(e).removeprefix("grulab: ")) from None
    return 0


def _shape(text: str) -> tuple[int, int, int, int]:
    """--shape T,B,I,H: four sizes, T at least 1."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or min(sizes) < 0 or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected T,B,I,H (four whole numbers, T >= 1, e.g. 35,32,28,256), got {text!r}")
    return sizes


# ---------------------------------------------------------------------------- parser
def _preset_help() -> str:
    """Each preset with the flags it stands for, read from PRESETS."""
    from grulab.lm.train import PRESETS, TrainConfig

    by_name = {f.name: f for f in fields(TrainConfig)}
    described = []
    for name, preset in PRESETS.items():
        words = []
        for key, value in preset.values.items():
            f = by_name[key]
            if isinstance(value, bool):  # said either way: --reset-before, --no-reset-before
                switch, sets = _switch_flag(f)
                words += [switch if value == sets else "--no-" + switch[2:]]
            elif isinstance(value, list):
                words += [flag(f), *map(shlex.quote, value)]
            else:
                words += [flag(f), str(value)]
        described.append(f"{name} = {preset.help}: {' '.join(words)}")
    return ("start from a named setting; the flags given win. " + "; ".join(described).replace("%", "%%")
            + ". On a corpus of the other script a preset continues the other notes' prefixes (and --d2l-text "
            "cleans by the script) (default: none, the defaults below)")


def _add_generate(sub) -> None:
    """The generate command (its ONNX path, added by onnx_cli, must not import torch)."""
    p = sub.add_parser("generate", help="continue a prefix with a trained model")
    p.add_argument("dir", help="run directory (the --out of grulab train)")
    p.add_argument("--prefix", help="text to continue (default: a newline)")
    p.add_argument("--length", type=int, default=200, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy, the notes' predict (default: %(default)s)")
    p.add_argument("--top-k", type=int, help="sample only from the K most likely tokens (default: all tokens)")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens whose probability reaches P "
                   "(default: all tokens)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling (default: unseeded)")
    p.set_defaults(func=cmd_generate)


def _top_parser():
    parser = _Parser(prog="grulab", description="Gated recurrent units: train, sample, evaluate, compare, look inside.")
    parser.add_argument("--version", action="version", version=f"grulab {__import__('grulab').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    return parser, sub


def _onnx_generate_parser() -> argparse.ArgumentParser:
    """Only `grulab generate` (and export), built without importing torch: `generate --onnx` runs torch-free."""
    from grulab.deploy.onnx_cli import add_commands

    parser, sub = _top_parser()
    _add_generate(sub)
    add_commands(sub)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from grulab.lm import compare
    from grulab.lm.model import CELLS
    from grulab.lm.train import PRESETS

    parser, sub = _top_parser()

    p = sub.add_parser("train", help="train a language model on a text",
                       description="Train a character- or word-level language model. Flags override --preset.")
    p.add_argument("--preset", choices=list(PRESETS), help=_preset_help())
    _add_config_flags(p, {})
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine: runs torchrun --standalone --nproc-per-node N "
                   "(for several machines, run torchrun yourself: docs/distributed.md) (default: 1)")
    p.set_defaults(func=cmd_train, config_defaults={})

    _add_generate(sub)

    p = sub.add_parser("eval", help="perplexity and bits per token of a text")
    p.add_argument("dir", help="run directory (the --out of grulab train)")
    p.add_argument("textfile", help="a UTF-8 text file (or a bundled corpus name)")
    p.add_argument("--json", action=_Switch, default=False, help="print one JSON object: perplexity, bits_per_token, "
                   "tokens")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train the cells under equal conditions, or sweep a hyperparameter")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells to compare (default: %(default)s)")
    p.add_argument("--sweep", help="vary one setting instead of the cell, NAME=V1,V2,..., e.g. hidden=64,128,256 or "
                   f"reset_after=true,false (PyTorch's GRU against the notes'); NAME is one of: "
                   f"{', '.join(compare.SWEEPABLE)} (default: compare the cells)")
    p.add_argument("--target-ppl", type=float, help="report the time each run needs to reach this validation "
                   "perplexity (default: the worst final validation perplexity, which every run reaches)")
    p.add_argument("--preset", choices=list(PRESETS), help="start every run from a named setting (see grulab train "
                   "--help); the flags given win, so give --max-minutes or --epochs for runs shorter than the "
                   "notes' (default: none, the defaults below)")
    _add_config_flags(p, compare.DEFAULTS, skip=("cell", "resume"))
    p.set_defaults(func=cmd_compare, config_defaults=compare.DEFAULTS)

    p = sub.add_parser("viz", help="colour a text by the GRU's gates (HTML page or PNG heatmap)")
    p.add_argument("dir", help="run directory of a GRU model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to run the model over; a long text is cut to its start, with a "
                     "warning: the page shows at most 10,000 tokens and stays under 20 MB (about 5,900 tokens for a 1×384 GRU)")
    src.add_argument("--file", help="a UTF-8 text file to run the model over (cut as --text is)")
    p.add_argument("--out", default="gates.html",
                   help="an .html file (interactive page) or a .png file (heatmap) (default: %(default)s)")
    p.set_defaults(func=cmd_viz)

    p = sub.add_parser("demo", help="the main job on bundled data: austen (train ~2 min, then generate) or cat-mouse")
    p.add_argument("name", nargs="?", default="austen", choices=["austen", "cat-mouse"],
                   help="which demo (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=2.0, help="training budget for the austen demo (default: %(default)s)")
    p.add_argument("--out", default="runs/demo", help="output directory; a second demo replaces the first one's "
                   "files there, and a directory holding another run is refused (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("kernels", help="which GRU kernel runs on this machine, and why (builds the native one if needed); "
                       "or, for one call shape, everything decided for it")
    p.add_argument("--shape", type=_shape, metavar="T,B,I,H", help="explain one call of a one-layer grulab.GRU: the kernel, "
                   "why the others were not picked, the ISA, packed or not, the split, the chunking and the threads")
    p.add_argument("--train", action=_Switch, default=False, help="with --shape: a training call (forward and backward); "
                   "off: inference")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"], help="tensor dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="device type (default: cpu)")
    p.add_argument("--reset-before", action=_Switch, default=False, help="ask for the notes' reset-before cell "
                   "(off: PyTorch's reset-after cell)")
    p.add_argument("--autocast-bf16", action=_Switch, default=False, help="ask about a call under "
                   "torch.autocast('cpu', dtype=torch.bfloat16): the bf16 kernel, or why it cannot run here")
    p.add_argument("--forget", action=_Switch, default=False, help="delete this machine's measured choices of impl='auto' "
                   "first, so the next call of each shape measures again (e.g. after they were made on a busy machine)")
    p.set_defaults(func=cmd_kernels)
    from grulab.deploy.onnx_cli import add_commands
    add_commands(sub)  # grulab export, grulab generate --onnx
    return parser


# ---------------------------------------------------------------------------- the environment
# torchrun's variables that grulab reads (grulab.lm.distributed, _me): whole numbers from this low
_WHOLE = {"RANK": 0, "LOCAL_RANK": 0, "WORLD_SIZE": 1, "MASTER_PORT": 1, "TORCHELASTIC_RESTART_COUNT": 0}
_SWITCH = ("1", "0", "true", "false", "yes", "no", "on", "off")  # GRULAB_AUTOTUNE's values


def check_environment(command: str) -> None:
    """Every environment variable grulab reads, checked before any command runs: a bad value is one
    line (UsageError, exit 2) naming the variable, its value and what it takes, before anything is
    created in a run directory or trained.

    GRULAB_KERNEL (a fused kernel this machine runs; its name alone for `grulab kernels`, which
    explains the rest), GRULAB_AUTOTUNE (on or off), GRULAB_CACHE or XDG_CACHE_HOME (where a
    directory can be made and written), torchrun's RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, TORCHELASTIC_RESTART_COUNT and TORCHELASTIC_USE_AGENT_STORE, and OMP_NUM_THREADS.
    """
    env = os.environ

    def bad(name: str, want: str) -> UsageError:
        return UsageError(f"{name}={env[name]!r} {want}; fix or unset {name}")

    for name, low in _WHOLE.items():
        if name in env:
            try:
                value = int(env[name])
            except ValueError:
                raise bad(name, "is not a whole number") from None
            top = 65535 if name == "MASTER_PORT" else None
            if value < low or (top is not None and value > top):
                raise bad(name, f"is out of range: it takes a whole number from {low}"
                          + (f" to {top}" if top else " up"))
    if "RANK" in env and "WORLD_SIZE" in env and int(env["RANK"]) >= int(env["WORLD_SIZE"]):
        raise bad("RANK", f"is not below WORLD_SIZE={env['WORLD_SIZE']} (ranks count from 0)")
    if "MASTER_ADDR" in env and not env["MASTER_ADDR"].strip():
        raise bad("MASTER_ADDR", "is empty: it takes the host name or address of rank 0's machine")
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "True") not in ("True", "False"):
        raise bad("TORCHELASTIC_USE_AGENT_STORE", "is not True or False (torchrun sets it)")
    if env.get("OMP_NUM_THREADS", "").strip() and not all(v.strip().isdigit() and int(v) > 0
                                                          for v in env["OMP_NUM_THREADS"].split(",")):
        raise bad("OMP_NUM_THREADS", "is not a positive whole number (threads per process)")
    if command == "train":
        from grulab.lm.distributed import missing_env

        missing = missing_env(env)
        if missing:
            raise UsageError(missing)
    autotune = env.get("GRULAB_AUTOTUNE", "").strip().lower()
    if autotune and autotune not in _SWITCH:
        raise bad("GRULAB_AUTOTUNE", f"is not on or off: it takes {', '.join(_SWITCH)} (0 turns measuring off)")
    _check_cache(env)
    if command != "generate --onnx" and env.get("GRULAB_KERNEL", "").strip():
        _check_kernel(command)


def _check_cache(env) -> None:
    """GRULAB_CACHE (or XDG_CACHE_HOME), where set: a directory grulab can make and write in."""
    from grulab.cache import default_cache_dir

    name = "GRULAB_CACHE" if env.get("GRULAB_CACHE") else "XDG_CACHE_HOME" if env.get("XDG_CACHE_HOME") else None
    if name is None:
        return  # ~/.cache/grulab: said when a command needs it and cannot make it
    where = default_cache_dir()
    fix = f"give {name} a writable directory (grulab's cache folder, created if missing) or unset it"
    try:
        blocker = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UsageError(f"{name}={env[name]!r}: {blocker} is a file, not a directory; {fix}")
        where.mkdir(parents=True, exist_ok=True)  # what its first use would do
    except OSError as e:
        raise UsageError(f"{name}={env[name]!r}: {where} cannot be created ({e.strerror}); {fix}") from None
    if not os.access(where, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise UsageError(f"{name}={env[name]!r}: {where} is not writable; {fix}")


def _check_kernel(command: str) -> None:
    """GRULAB_KERNEL names a fused kernel (grulab.kernels.forced) and, for the commands that run a
    model, one this machine runs."""
    from grulab import kernels

    try:
        name = kernels.forced()
    except ValueError as e:
        raise UsageError(f"{e}; fix or unset {kernels.ENV} (grulab kernels lists them)") from None
    if command == "kernels" or name is None:
        return  # the report says what runs and why
    why = kernels.BY_NAME[name].why_not(kernels.Query())
    if why is not None:
        raise UsageError(f"{kernels.ENV}={name} cannot run here: {why}; unset {kernels.ENV} or pick another "
                         "kernel (grulab kernels lists them)")


def _me() -> str:
    """Who speaks in an error line: grulab, with the rank on the other processes of a torchrun run."""
    rank = os.environ.get("RANK", "0") if "LOCAL_RANK" in os.environ else "0"
    return "grulab" if rank == "0" else f"grulab (rank {rank})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        onnx_path = argv[:1] == ["generate"] and any(a == "--onnx" or a.startswith("--onnx=") for a in argv)
        args = (_onnx_generate_parser() if onnx_path else build_parser()).parse_args(argv)
        args.argv = argv
        check_environment("generate --onnx" if onnx_path else args.command)
        return args.func(args)
    except GrulabError as e:
        print(f"{_me()}: error: {e}", file=sys.stderr)
        if getattr(e, "exit_now", False) and "LOCAL_RANK" in os.environ:
            # A torchrun worker whose peer died (distributed.LostPeer): everything is unwound
            # (checkpoint, files, the process group torn down) and the line is out, but the
            # interpreter's own exit could still wait on the broken group (gloo work left behind)
            # until --timeout: seen as a worker alive 60 s after its line, which kept the node's
            # torchrun, and so the run, from ending.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP as grulab.lm.signals.Stopped
        code = getattr(e, "exit_code", 130)
        print(f"{_me()}: interrupted" if code == 130 else f"{_me()}: stopped by {e}", file=sys.stderr)
        return code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
