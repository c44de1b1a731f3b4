"""Checkpoints: safetensors weights, a JSON config, the vocabulary. No pickle.

A run directory holds ``checkpoint/`` with

    model.safetensors      the model's state_dict
    optimizer.safetensors  the optimizer's tensors (for --resume)
    state.safetensors      RNG states and the carried hidden state (for --resume)
    vocab.json             the vocabulary
    config.json            model config, training config, progress, optimizer scalars,
                           and the save's serial number, file sizes and metrics length

and ``metrics.jsonl`` next to it, one row per report.

A save survives any number of kills, at any point, in a row: the newest
complete checkpoint is never removed or changed. A save

1. finishes a save a crash cut short: the newest complete checkpoint, under
   ``checkpoint/``, ``checkpoint.old/`` or ``checkpoint.tmp/``, is moved to
   ``checkpoint/`` by renames (each one atomic);
2. writes everything to a fresh ``checkpoint.tmp/``, config.json last, each file
   fsync'ed; a directory is complete when its config.json parses and lists
   every file with its size;
3. renames ``checkpoint/`` to ``checkpoint.old/`` and ``checkpoint.tmp/`` to
   ``checkpoint/``, then removes ``checkpoint.old/``.

:func:`find` takes the complete one with the highest serial among the three.

Metrics rows: the caller appends a report's row (:func:`append_metrics`) *before*
saving, and the checkpoint records the length of ``metrics.jsonl``. On resume
:func:`trim_metrics` drops rows written after the checkpoint (their training is
done again), so across crashes no row is lost and none is doubled.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from grulab.lm import rundir
from grulab.lm.data import Vocab
from grulab.errors import GrulabError
from grulab.lm.model import LanguageModel, ModelConfig
from grulab.lm.settings import TrainConfig
from grulab.lm.validate import check_section

FORMAT = "grulab-checkpoint-1"
CHECKPOINT = "checkpoint"
OLD, TMP = CHECKPOINT + ".old", CHECKPOINT + ".tmp"
METRICS = "metrics.jsonl"


@dataclass
class Checkpoint:
    model: LanguageModel  # weights loaded, in eval mode
    vocab: Vocab  # the vocabulary the model was trained with
    train: dict = field(default_factory=dict)  # the training config, as saved
    progress: dict = field(default_factory=dict)  # epoch, step, tokens, best val ppl, ...
    path: Optional[Path] = None  # the checkpoint directory
    optimizer: Optional[dict] = None  # optimizer state_dict (when saved)
    extra: dict = field(default_factory=dict)  # RNG states, carried hidden state
    metrics_bytes: Optional[int] = None  # length of metrics.jsonl when saved (None: not recorded)


# ---------------------------------------------------------------------------- durable writes
def _write(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it; mode 0666 less the umask, like any new file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _fsync_dir(path: Path) -> None:
    """Make the renames and new names in a directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and the rest (JSON)."""
    tensors, scalars = {}, {}
    for pid, pstate in state_dict["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, key = flat.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _complete(ckpt: Path) -> Optional[dict]:
    """The config of a complete checkpoint directory, else None."""
    try:
        config = json.loads((ckpt / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    files = config.get("files")
    if files is None:  # saved before sizes were recorded: trust it, unless it is a leftover .tmp
        return config if ckpt.name != TMP else None
    try:
        return config if all((ckpt / name).stat().st_size == size for name, size in files.items()) else None
    except (OSError, TypeError, AttributeError):
        return None


def _newest(run_dir: Path) -> Optional[tuple[int, Path]]:
    """The serial and directory of the newest complete checkpoint in a run directory."""
    best = None
    for name in (CHECKPOINT, OLD, TMP):  # on a tie the first wins
        config = _complete(run_dir / name)
        serial = config.get("serial", 0) if config is not None else None
        if isinstance(serial, int) and (best is None or serial > best[0]):
            best = (serial, run_dir / name)
    return best


def _recover(run_dir: Path) -> int:
    """Move the newest complete checkpoint to ``checkpoint/`` if a crash left it elsewhere;
    return its serial (0 if there is none). Each step is a rename or removes a directory
    that holds nothing newer, so a crash in here loses nothing either."""
    best = _newest(run_dir)
    if best is None:
        return 0
    serial, where = best
    final = run_dir / CHECKPOINT
    if where != final:
        spare = run_dir / (OLD if where.name == TMP else TMP)
        _rmtree(spare)
        if final.exists():
            os.replace(final, spare)
        os.replace(where, final)
        _fsync_dir(run_dir)
    return serial


def save(
    run_dir: Path,
    model: LanguageModel,
    vocab: Vocab,
    train: dict,
    progress: dict,
    optimizer: Optional[torch.optim.Optimizer] = None,
    extra: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write ``run_dir/checkpoint/`` so that no crash can lose the last complete one; return its path.

    A failing write (a full disk, a read-only directory) raises GrulabError and
    leaves no ``checkpoint.tmp/`` behind.
    """
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / CHECKPOINT, run_dir / TMP, run_dir / OLD
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        serial = _recover(run_dir) + 1
        _rmtree(tmp)
        _rmtree(old)
    except OSError as e:
        raise GrulabError(f"cannot save a checkpoint in {run_dir}: {e.strerror or e}; "
                          "check that it is a writable directory, or give another --out") from None
    files = {"model.safetensors": safetensors_bytes({k: v.detach().contiguous() for k, v in model.state_dict().items()})}
    config = {"format": FORMAT, "serial": serial, "model": model.config.to_dict(), "train": train,
              "progress": progress}
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        files["optimizer.safetensors"] = safetensors_bytes(tensors)
        config["optimizer"] = meta
    if extra:
        files["state.safetensors"] = safetensors_bytes({k: v.contiguous() for k, v in extra.items()})
    files["vocab.json"] = vocab.to_json().encode("utf-8")
    metrics = run_dir / METRICS
    config["files"] = {name: len(data) for name, data in files.items()}
    config["metrics_bytes"] = metrics.stat().st_size if metrics.exists() else 0
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write(tmp / name, data)
        _write(tmp / "config.json", _json_bytes(config))  # last: it makes the directory complete
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GrulabError(f"cannot save the checkpoint in {run_dir}: {e.strerror or e}; "
                          "free some disk space or give another --out (the last checkpoint is kept)") from None
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    _rmtree(old)
    return final


def append_metrics(run_dir: Path, row: dict) -> None:
    """Append one row to ``metrics.jsonl`` durably; call it before the save the row belongs to.

    If the write fails (a full disk), the file is cut back to its old length and
    GrulabError says so.
    """
    path = Path(run_dir) / METRICS
    line = (json.dumps(row) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:
        raise GrulabError(f"cannot write {path}: {e.strerror}; give a writable --out") from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, size)
            raise GrulabError(f"cannot write {path}: {e.strerror}; free some disk space and resume with --resume") from None
    finally:
        os.close(fd)


def trim_metrics(run_dir: Path, ckpt: Checkpoint) -> None:
    """On resume: drop the metrics rows written after ``ckpt`` was saved (their training is redone)."""
    path = Path(run_dir) / METRICS
    if ckpt.metrics_bytes is not None and path.exists() and path.stat().st_size > ckpt.metrics_bytes:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, ckpt.metrics_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)


def find(path: Path) -> Path:
    """The checkpoint directory for a run directory or a checkpoint directory.

    In a run directory: the newest complete checkpoint wherever a crash left it;
    if none is complete, ``checkpoint/`` itself, so that loading says what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise GrulabError(f"no checkpoint at {path}: the path does not exist; pass the --out directory of a `grulab train` run")
    if (path / "config.json").is_file():
        return path
    best = _newest(path)
    if best is not None:
        return best[1]
    if (path / CHECKPOINT / "config.json").is_file():
        return path / CHECKPOINT
    live = still_training(path)
    if live is not None:
        raise GrulabError(f"{live}: it saves one at its first report; try again then")
    if (path / METRICS).exists():
        raise GrulabError(f"no checkpoint in {path}: its run ended before its first checkpoint, so there is nothing "
                          f"to load or resume; train it again: grulab train --out {path} (with --overwrite if it "
                          "refuses)")
    raise GrulabError(f"no checkpoint in {path}: expected {path / CHECKPOINT / 'config.json'}; pass the --out directory of a `grulab train` run")


def still_training(run_dir: Path) -> Optional[str]:
    """"RUN is still training (pid N); no checkpoint yet" (or "...; last checkpoint at DIR (epoch E)")
    while another process trains in ``run_dir`` (it holds the run's lock); None otherwise."""
    run_dir = Path(run_dir)
    who = rundir.holder(run_dir)
    if who is None:
        return None
    best = _newest(run_dir)
    if best is None:
        return f"{run_dir} is still training ({who}); no checkpoint yet"
    progress = (_complete(best[1]) or {}).get("progress")
    progress = progress if isinstance(progress, dict) else {}
    epoch, batch = progress.get("epoch"), progress.get("batch")
    at = ""
    if isinstance(epoch, int) and isinstance(batch, int) and (epoch or batch):
        at = f" (after {epoch} epoch{'s' * (epoch != 1)}{f' and {batch} batches' if batch else ''})"
    return f"{run_dir} is still training ({who}); last checkpoint at {best[1]}{at}"


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    try:
        with open(path, "rb"):  # an OSError here names the real cause (permission denied, not found)
            pass
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except OSError as e:
        raise GrulabError(f"cannot read the weights {path}: {e.strerror}; "
                          + ("check the file's permissions" if isinstance(e, PermissionError) else "retrain or restore the file")) from None
    except SafetensorError as e:
        raise GrulabError(f"corrupt or missing weights {path}: {e}; retrain or restore the file") from None


GATES = {"gru": 3, "lstm": 4, "rnn": 1}  # rows of weight_ih per hidden unit, as torch.nn lays them out


def _expected_shapes(c: ModelConfig) -> Optional[dict[str, tuple[int, ...]]]:
    """The state_dict shapes of LanguageModel(c), computed, not allocated (None for a cell not listed).

    Building the model on the meta device would say the same, but its first use
    imports torch._dynamo (4 s); a test holds this table to the real model.
    """
    if c.cell not in GATES:
        return None
    g, h = GATES[c.cell] * c.hidden, c.hidden
    shapes = {"embedding.weight": (c.vocab_size, c.embed)} if c.embed else {}
    for k in range(c.layers):
        shapes.update({f"rnn.weight_ih_l{k}": (g, h if k else (c.embed or c.vocab_size)),
                       f"rnn.weight_hh_l{k}": (g, h), f"rnn.bias_ih_l{k}": (g,), f"rnn.bias_hh_l{k}": (g,)})
    shapes.update({"head.weight": (c.vocab_size, h), "head.bias": (c.vocab_size,)})
    return shapes


def _check_weights(path: Path, config: ModelConfig) -> None:
    """Refuse weights whose names or shapes do not fit ``config``, before anything is allocated."""
    got = _weight_shapes(path)
    want = _expected_shapes(config)
    if want is None:
        return  # load_state_dict will say
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            problem = (f"{name} is missing" if name not in got else f"{name} is not in the model" if name not in want
                       else f"{name} has shape {list(got[name])}, the config needs {list(want[name])}")
            raise GrulabError(f"weights in {path} do not fit the model in config.json "
                              f"({config.cell}, hidden {config.hidden}, layers {config.layers}, embed {config.embed}, "
                              f"{config.vocab_size} tokens): {problem}; restore the files saved together")


def load(path: Path, with_training_state: bool = False, note_live: bool = False) -> Checkpoint:
    """Load a checkpoint; every problem is a GrulabError that names the file and the fix.

    config.json is checked (types, ranges, weight shapes from the safetensors
    header) before any tensor is allocated; weights that are not finite are refused.
    ``note_live``: a run still training is said in a warning (the commands that read a run:
    generate, eval, viz, export), and its last checkpoint is loaded.
    """
    ckpt = find(path)
    if note_live and ckpt.parent == Path(path) and ckpt.name in (CHECKPOINT, OLD, TMP):
        live = still_training(Path(path))
        if live is not None:
            warnings.warn(f"{live}; using that checkpoint", stacklevel=2)
    cfg_path = ckpt / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except PermissionError as e:
        raise GrulabError(f"cannot read {cfg_path}: {e.strerror}; check the file's permissions") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GrulabError(f"corrupt checkpoint config {cfg_path}: {e}; retrain or restore the file") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise GrulabError(f"{cfg_path} is not a grulab checkpoint (format {config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")
    fix = "restore the config.json saved with the weights, or retrain"

    check_section(config.get("model"), ModelConfig, f"{cfg_path}: model", fix)
    check_section(config.get("train", {}), TrainConfig, f"{cfg_path}: train", fix)
    if not isinstance(config.get("progress", {}), dict):
        raise GrulabError(f"{cfg_path}: progress must be a JSON object; {fix}")
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise GrulabError(f"bad model config in {cfg_path}: {e}") from None
    vocab = Vocab.load(ckpt / "vocab.json")
    if len(vocab) != model_config.vocab_size:
        raise GrulabError(
            f"checkpoint {ckpt} does not match its vocabulary: the model has {model_config.vocab_size} "
            f"tokens, vocab.json has {len(vocab)}; restore the vocab.json saved with this model"
        )
    weights_path = ckpt / "model.safetensors"
    _check_weights(weights_path, model_config)
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError) as e:
        raise GrulabError(f"corrupt or missing weights {weights_path}: {e}; retrain or restore the file") from None
    for name, w in weights.items():
        if w.is_floating_point() and not torch.isfinite(w).all():
            raise GrulabError(f"weights in {weights_path} are not finite ({name} holds NaN or Inf): the run diverged "
                              "or the file is damaged; use an earlier checkpoint or retrain")
    model = LanguageModel(model_config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # a cell _expected_shapes does not list
        first = str(e).strip().splitlines()
        raise GrulabError(
            f"weights in {weights_path} do not fit the model in config.json "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None
    model.eval()
    metrics_bytes = config.get("metrics_bytes")
    result = Checkpoint(model, vocab, config.get("train", {}), config.get("progress", {}), ckpt,
                        metrics_bytes=metrics_bytes if isinstance(metrics_bytes, int) else None)
    if with_training_state:
        try:
            if (ckpt / "optimizer.safetensors").exists():
                result.optimizer = _unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")), config["optimizer"])
            if (ckpt / "state.safetensors").exists():
                result.extra = load_file(str(ckpt / "state.safetensors"))
        except (OSError, SafetensorError, KeyError) as e:
            raise GrulabError(f"corrupt training state in {ckpt}: {e}; resume is not possible, start a new run") from None
    return result
