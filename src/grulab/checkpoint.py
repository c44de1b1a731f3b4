"""Checkpoints: safetensors weights, a JSON config, the vocabulary. No pickle.

A run directory holds ``checkpoint/`` with

    model.safetensors      the model's state_dict
    optimizer.safetensors  the optimizer's tensors (for --resume)
    state.safetensors      RNG states and the carried hidden state (for --resume)
    config.json            model config, training config, progress, optimizer scalars
    vocab.json             the vocabulary

It is written atomically: everything goes to ``checkpoint.tmp/``, which then
replaces ``checkpoint/`` by renames, so an interrupted save never leaves a
half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import Vocab
from .errors import GrulabError
from .model import LanguageModel, ModelConfig

FORMAT = "grulab-checkpoint-1"
CHECKPOINT = "checkpoint"


@dataclass
class Checkpoint:
    model: LanguageModel  # weights loaded, in eval mode
    vocab: Vocab  # the vocabulary the model was trained with
    train: dict = field(default_factory=dict)  # the training config, as saved
    progress: dict = field(default_factory=dict)  # epoch, step, tokens, best val ppl, ...
    path: Optional[Path] = None  # the checkpoint directory
    optimizer: Optional[dict] = None  # optimizer state_dict (when saved)
    extra: dict = field(default_factory=dict)  # RNG states, carried hidden state


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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


def save(
    run_dir: Path,
    model: LanguageModel,
    vocab: Vocab,
    train: dict,
    progress: dict,
    optimizer: Optional[torch.optim.Optimizer] = None,
    extra: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write ``run_dir/checkpoint/`` atomically and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, tmp, old = (run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".tmp"), run_dir / (CHECKPOINT + ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    config = {"format": FORMAT, "model": model.config.to_dict(), "train": train, "progress": progress}
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        config["optimizer"] = meta
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp / "state.safetensors"))
    vocab.save(tmp / "vocab.json")
    _write_json(tmp / "config.json", config)
    # swap: checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint, drop old
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(path: Path) -> Path:
    """The checkpoint directory for a run directory or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise GrulabError(f"no checkpoint at {path}: the path does not exist; pass the --out directory of a `grulab train` run")
    for candidate in (path, path / CHECKPOINT, path / (CHECKPOINT + ".old")):
        if (candidate / "config.json").is_file():
            return candidate
    raise GrulabError(f"no checkpoint in {path}: expected {path / CHECKPOINT / 'config.json'}; pass the --out directory of a `grulab train` run")


def load(path: Path, with_training_state: bool = False) -> Checkpoint:
    """Load a checkpoint; every problem is a GrulabError that names the file and the fix."""
    ckpt = find(path)
    try:
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GrulabError(f"corrupt checkpoint config {ckpt / 'config.json'}: {e}; retrain or restore the file") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise GrulabError(f"{ckpt / 'config.json'} is not a grulab checkpoint (format {config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise GrulabError(f"bad model config in {ckpt / 'config.json'}: {e}") from None
    vocab = Vocab.load(ckpt / "vocab.json")
    if len(vocab) != model_config.vocab_size:
        raise GrulabError(
            f"checkpoint {ckpt} does not match its vocabulary: the model has {model_config.vocab_size} "
            f"tokens, vocab.json has {len(vocab)}; restore the vocab.json saved with this model"
        )
    model = LanguageModel(model_config)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise GrulabError(f"corrupt or missing weights {ckpt / 'model.safetensors'}: {e}; retrain or restore the file") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise GrulabError(
            f"weights in {ckpt / 'model.safetensors'} do not fit the model in config.json "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None
    model.eval()
    result = Checkpoint(model, vocab, config.get("train", {}), config.get("progress", {}), ckpt)
    if with_training_state:
        try:
            if (ckpt / "optimizer.safetensors").exists():
                result.optimizer = _unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")), config["optimizer"])
            if (ckpt / "state.safetensors").exists():
                result.extra = load_file(str(ckpt / "state.safetensors"))
        except (OSError, SafetensorError, KeyError) as e:
            raise GrulabError(f"corrupt training state in {ckpt}: {e}; resume is not possible, start a new run") from None
    return result
