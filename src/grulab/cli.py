"""The ``grulab`` command: train, generate, eval, compare, viz, demo.

Training flags come from :class:`grulab.train.TrainConfig`: one dashed flag
per field, its default and help text taken from the dataclass, so the two
never drift apart. Bad input ends in one line on stderr and a non-zero exit
(2 for usage, 1 otherwise), never a traceback.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional, Sequence

from .errors import GrulabError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _field_help(cls) -> dict[str, str]:
    """The ``# comment`` after each field of a config dataclass, as its help text."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip()
    return helps


_FLAG_NAMES = {"prefixes": "--prefix"}  # fields whose flag is not just the dashed field name


def _add_config_flags(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """One flag per dataclass field. Flags not given stay out of the namespace
    (SUPPRESS), so a preset's values are overridden only by what the user typed."""
    helps = _field_help(cls)
    defaults = cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = _FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        common = dict(dest=f.name, default=argparse.SUPPRESS)
        help_text = helps.get(f.name, "")
        if isinstance(default, bool):
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_false",
                                    help=f"turn off: {help_text}", **common)
            else:
                parser.add_argument(flag, action="store_true", help=help_text, **common)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", metavar="TEXT", help=help_text, **common)
        else:
            parser.add_argument(flag, type=type(default), metavar=f.name.upper().split("_")[-1],
                                help=f"{help_text} (default: {default})", **common)


def _given(args: argparse.Namespace, cls) -> dict:
    """The config fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from . import rundir, validate
    from .train import TrainConfig, resume_config, train, with_preset

    given = _given(args, TrainConfig)
    validate.check_flags(given, validate.TRAIN_FIELDS)  # issue 11: ranges before anything is built
    if given.pop("resume", False):
        if args.preset:
            raise UsageError("--preset cannot change on --resume: the run keeps its settings")
        config = resume_config(given.pop("out", TrainConfig().out), **given)
    else:
        config = replace(with_preset(TrainConfig(), args.preset), **given)
    with rundir.claim(Path(config.out), resume=config.resume, overwrite=args.overwrite):  # issue 11
        last = train(config)
    if last:
        print(f"done: val perplexity {last['val_ppl']:.3f}, train perplexity {last['train_ppl']:.3f}, "
              f"checkpoint in {Path(config.out) / 'checkpoint'}")
    return 0


def _check_number(flag: str, value, low=None, inclusive=True, high=None):
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if low is not None and (value < low or (not inclusive and value == low)):
        raise UsageError(f"{flag} must be {'>=' if inclusive else '>'} {low}, got {value}")
    if high is not None and value > high:
        raise UsageError(f"{flag} must be <= {high}, got {value}")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from . import checkpoint, validate
    from .generate import generate

    _check_number("--length", args.length, 0)
    _check_number("--temperature", args.temperature, 0)
    _check_number("--top-k", args.top_k, 1)
    _check_number("--top-p", args.top_p, 0, inclusive=False, high=1)
    validate.check_flag("seed", args.seed, validate.SEED)  # issue 11
    ckpt = checkpoint.load(Path(args.dir))
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

    from . import checkpoint, validate
    from .data import d2l_preprocess, load_corpus, tokenize
    from .train import evaluate

    ckpt = checkpoint.load(Path(args.dir))
    text = load_corpus(args.textfile)
    if ckpt.train.get("d2l_text"):
        text = d2l_preprocess(text)
    tokens = tokenize(text, ckpt.vocab.level)
    unknown = ckpt.vocab.unknown_tokens(tokens)
    if unknown:
        warnings.warn(f"{len(unknown)} distinct tokens of {args.textfile} are not in the model's vocabulary "
                      f"and count as <unk>: {', '.join(map(repr, unknown[:8]))}{' …' if len(unknown) > 8 else ''}")
    if len(tokens) < 2:
        raise GrulabError(f"{args.textfile} has {len(tokens)} token(s); evaluation needs at least 2")
    ids = torch.tensor(ckpt.vocab.encode(tokens), dtype=torch.long)
    nll, n = evaluate(ckpt.model, ids, 32, int(ckpt.train.get("num_steps", 64)))
    ppl = validate.finite_perplexity(nll, args.textfile)  # issue 11: a NaN perplexity exits 1
    result = {"perplexity": ppl, "bits_per_token": nll / math.log(2), "tokens": n}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f}  bits/token {result['bits_per_token']:.4f}  "
              f"tokens {n:,}  ({ckpt.vocab.level} level, {args.textfile})")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from . import checkpoint, viz
    from .data import load_corpus

    text = args.text if args.text is not None else load_corpus(args.file)
    ckpt = checkpoint.load(Path(args.dir))
    path = viz.render(ckpt.model, ckpt.vocab, text, Path(args.out))
    print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import compare
    from .train import TrainConfig

    compare.run(args.cells, _given(args, TrainConfig), args.sweep, Path(args.out), args.target_ppl)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.name == "cat-mouse":
        from . import catmouse

        catmouse.run(out_dir=Path(args.out))
        return 0
    from .generate import generate
    from .train import TrainConfig, train
    from . import checkpoint

    out = Path(args.out)
    print(f"grulab demo: training a character-level GRU on Jane Austen for {args.minutes:g} minutes (Ctrl-C stops early)")
    train(TrainConfig(corpus="austen", max_minutes=args.minutes, out=str(out),
                      prefixes=["Elizabeth ", "It is a truth "]))
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


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .train import PRESETS, TrainConfig

    parser = _Parser(prog="grulab", description="Gated recurrent units: train, sample, evaluate, compare, look inside.")
    parser.add_argument("--version", action="version", version=f"grulab {__import__('grulab').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a language model on a text",
                       description="Train a character- or word-level language model. Flags override --preset.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named setting: d2l = the notes' "
                   "one-hot GRU(256), SGD lr 1, clip 1, batch 32×35, random sampling, 500 epochs")
    _add_config_flags(p, TrainConfig)
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (issue 11)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prefix with a trained model")
    p.add_argument("dir", help="run directory (the --out of grulab train)")
    p.add_argument("--prefix", help="text to continue (default: a newline)")
    p.add_argument("--length", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy, the notes' predict (default: 0.8)")
    p.add_argument("--top-k", type=int, help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens whose probability reaches P")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity and bits per token of a text")
    p.add_argument("dir", help="run directory (the --out of grulab train)")
    p.add_argument("textfile", help="a UTF-8 text file (or a bundled corpus name)")
    p.add_argument("--json", action="store_true", help="print one JSON object: perplexity, bits_per_token, tokens")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train RNN, GRU and LSTM under equal conditions, or sweep a hyperparameter")
    p.add_argument("--cells", default="rnn,gru,lstm", help="comma-separated cells to compare (default: rnn,gru,lstm)")
    p.add_argument("--sweep", help="vary one setting instead, e.g. hidden=64,128,256 (also lr, num-steps, layers, embed, batch-size)")
    p.add_argument("--target-ppl", type=float, help="report the time each run needs to reach this validation perplexity")
    _add_config_flags(p, TrainConfig, skip=("cell", "resume"))
    p.set_defaults(func=cmd_compare, out="runs/compare", max_minutes=1.0)

    p = sub.add_parser("viz", help="colour a text by the GRU's gates (HTML page or PNG heatmap)")
    p.add_argument("dir", help="run directory of a GRU model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to run the model over")
    src.add_argument("--file", help="a UTF-8 text file to run the model over")
    p.add_argument("--out", default="gates.html", help="gates.html (interactive page) or gates.png (heatmap)")
    p.set_defaults(func=cmd_viz)

    p = sub.add_parser("demo", help="the main job on bundled data: austen (train ~2 min, then generate) or cat-mouse")
    p.add_argument("name", nargs="?", default="austen", choices=["austen", "cat-mouse"], help="which demo (default: austen)")
    p.add_argument("--minutes", type=float, default=2.0, help="training budget for the austen demo (default: 2)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except GrulabError as e:
        print(f"grulab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP via grulab.signals.Stopped (issue 11)
        code = getattr(e, "exit_code", 130)
        print("grulab: interrupted" if code == 130 else f"grulab: stopped by {e}", file=sys.stderr)
        return code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
