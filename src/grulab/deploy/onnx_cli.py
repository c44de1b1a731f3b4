"""The ONNX commands: ``grulab export RUN --onnx FILE`` and ``grulab generate RUN --onnx FILE``.

:func:`add_commands` is called once at the end of :func:`grulab.cli.build_parser`:
it adds the ``export`` command and an ``--onnx`` flag to ``generate`` (which then
runs through onnxruntime, with the rest of generate's flags unchanged).
Bad input is a :class:`~grulab.errors.GrulabError`: one line, non-zero exit.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from grulab.errors import ConfigError, GrulabError, UsageError

_INSTALL = "pip install 'grulab[export]'"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``grulab export``, and ``--onnx`` on the ``generate`` parser already in ``sub``."""
    p = sub.add_parser("export", help="write a trained model as an ONNX file (runs in onnxruntime)",
                       description="Export a trained language model to ONNX: tokens (B, T) and an optional "
                                   "state in, logits and the new state out; batch and length are dynamic. "
                                   "The file is checked in onnxruntime against PyTorch before the command ends.")
    p.add_argument("dir", help="run directory (the --out of grulab train)")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, help="ONNX opset version (default: grulab.deploy.export.DEFAULT_OPSET, printed on export)")
    p.set_defaults(func=cmd_export)

    gen = sub.choices["generate"]
    gen.add_argument("--onnx", metavar="FILE", help="run this file from `grulab export` in onnxruntime; the "
                     "vocabulary comes from the run (default: PyTorch runs the run's checkpoint)")
    torch_path = gen.get_default("func")
    gen.set_defaults(func=lambda args: cmd_generate_onnx(args) if args.onnx else torch_path(args))


def _onnx_error(e: Exception) -> GrulabError:
    return GrulabError(f"{e.name or 'onnx'} is not installed ({e}); {_INSTALL}")


def cmd_export(args: argparse.Namespace) -> int:
    from grulab.lm import checkpoint

    try:
        from grulab.deploy.export import DEFAULT_OPSET, build_onnx
        import onnx
    except ImportError as e:
        raise _onnx_error(e) from None
    ckpt = checkpoint.load(Path(args.dir), note_live=True)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    try:
        proto = build_onnx(ckpt.model, opset, ckpt.vocab)
    except (TypeError, ValueError) as e:
        raise GrulabError(f"cannot export {args.dir}: {str(e).removeprefix('export_onnx: ')}") from None
    out = Path(args.onnx)
    tmp = out.with_name(out.name + ".tmp")
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)  # whole or not at all
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise GrulabError(f"cannot write {out}: {e.strerror or e}; give --onnx a path in a writable directory") from None
    line = f"wrote {out} (opset {opset}, {out.stat().st_size / 1e6:.2f} MB)"
    if importlib.util.find_spec("onnxruntime") is None:
        print(f"{line}; onnxruntime is not installed, so it was not checked ({_INSTALL})")
        return 0
    diff = max_difference(ckpt.model, out)
    if not diff <= 1e-4:
        out.unlink()
        raise GrulabError(f"{out} disagrees with the PyTorch model (max |difference| {diff:.2e} in the logits or state); "
                          f"this is a bug in grulab's exporter, please report it")
    print(f"{line}; onnxruntime matches PyTorch to {diff:.1e} on a random batch")
    return 0


def max_difference(model, path: Path, batch: int = 3, length: int = 17, seed: int = 0) -> float:
    """Max |logits and state difference| between ``model`` and its ONNX file on random tokens, in two chunks
    (the second carries the state), through onnxruntime and PyTorch."""
    import numpy as np
    import torch

    from grulab.deploy.onnx_generate import OnnxLanguageModel

    lm = OnnxLanguageModel(path)
    tokens = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    diffs, ort_state, state = [], None, None
    with torch.no_grad():
        for chunk in (tokens[:, : length // 2], tokens[:, length // 2:]):
            logits, state = model(chunk, state)
            ort_logits, ort_state = lm(chunk.numpy(), ort_state)
            ours = (state,) if torch.is_tensor(state) else state
            diffs += [np.abs(ort_logits - logits.numpy()).max()]
            diffs += [np.abs(a - b.numpy()).max() for a, b in zip(ort_state.values(), ours)]
    return float(max(diffs))


def cmd_generate_onnx(args: argparse.Namespace) -> int:
    import numpy as np

    from grulab.lm.data import check_sampling
    from grulab.deploy.onnx_generate import OnnxLanguageModel, generate

    try:
        check_sampling(args.length, args.temperature, args.top_k, args.top_p, args.seed)
    except ConfigError as e:  # named as the parameter (top_k); told as the flag (--top-k)
        raise UsageError(f"--{e.name.replace('_', '-')} must be {e.want}, got {e.value!r}") from None
    try:
        rng = np.random.default_rng(args.seed)
    except ValueError:
        raise UsageError(f"--seed must be an integer >= 0, got {args.seed}") from None
    if not Path(args.onnx).is_file():
        raise GrulabError(f"no ONNX file at {args.onnx}; write one with `grulab export {args.dir} --onnx {args.onnx}`")
    lm = OnnxLanguageModel(args.onnx)
    vocab = _run_vocab(Path(args.dir), lm.vocab)
    if lm.vocab is not None and lm.vocab != vocab:
        raise GrulabError(f"{args.onnx} was exported with another vocabulary than the run {args.dir}; "
                          f"export this run again or give the run it came from")
    prefix = args.prefix if args.prefix is not None else "\n"
    sys.stdout.write(prefix)
    for piece in generate(lm, vocab, prefix, args.length, args.temperature, args.top_k, args.top_p, rng):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _run_vocab(run: Path, stored):
    """The run's vocabulary. A file from `grulab export` carries its own, checked against the
    run's vocab.json read as plain JSON (no torch); only a file without one needs checkpoint.find."""
    from grulab.lm.data import Vocab

    if stored is not None:
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
            if (run / name / "vocab.json").is_file():
                return Vocab.load(run / name / "vocab.json")
        if not run.is_dir():
            raise GrulabError(f"no run directory at {run}; give the --out of grulab train")
        return stored
    from grulab.lm.checkpoint import find  # loads torch (checkpoint.py imports it)

    return Vocab.load(find(run) / "vocab.json")
