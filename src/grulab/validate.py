"""Check a config's values (from config.json or flags) before anything is built from them.

A table maps each field to what it may hold; :func:`check_fields` raises one
GrulabError naming the field, the value and the fix for the first bad one:

    check_fields({"hidden": 10**9}, MODEL_FIELDS, where="run/checkpoint/config.json", fix="...")
    # GrulabError: run/checkpoint/config.json: hidden = 1000000000 is out of range: want an integer in [1, 65536]; ...

A dataclass can carry the same table in its annotations,
``hidden: Annotated[int, Int(1, 65536)] = 256`` and ``impl: Literal["auto", "fused"] = "auto"``;
:func:`specs_of` reads it from there, so the table and the config are one thing.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import GrulabError
from .gru import IMPLS
from .model import CELLS


@dataclass(frozen=True)
class Int:
    """An integer in [low, high] (bool is not an integer here)."""

    low: int
    high: int

    def problem(self, v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"not an integer: want an integer in [{self.low}, {self.high}]"
        if not self.low <= v <= self.high:
            return f"out of range: want an integer in [{self.low}, {self.high}]"
        return None


@dataclass(frozen=True)
class Real:
    """A finite number in [low, high], or [low, high) with ``high_open``, (low, high] with ``low_open``."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def problem(self, v: Any) -> Optional[str]:
        span = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"not a number: want a number in {span}"
        ok = (math.isfinite(v) and (v > self.low if self.low_open else v >= self.low)
              and (v < self.high if self.high_open else v <= self.high))
        return None if ok else f"out of range: want a number in {span}"


@dataclass(frozen=True)
class Choice:
    options: tuple

    def problem(self, v: Any) -> Optional[str]:
        if isinstance(v, bool) or v not in self.options:  # True == 1, so bools never match numbers
            return f"not a valid choice: want one of {', '.join(map(str, self.options))}"
        return None


@dataclass(frozen=True)
class Bool:
    def problem(self, v: Any) -> Optional[str]:
        return None if isinstance(v, bool) else "not a boolean: want true or false"


@dataclass(frozen=True)
class Text:
    def problem(self, v: Any) -> Optional[str]:
        return None if isinstance(v, str) else "not a string"


@dataclass(frozen=True)
class Texts:
    def problem(self, v: Any) -> Optional[str]:
        ok = isinstance(v, list) and all(isinstance(s, str) for s in v)
        return None if ok else "not a list of strings"


Spec = Union[Int, Real, Choice, Bool, Text, Texts]


def _shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def check_fields(values: Any, specs: Mapping[str, Spec], where: str, fix: str,
                 required: Sequence[str] = ()) -> None:
    """Raise GrulabError for the first value its spec refuses, or a required field that is missing.

    ``where`` names the place, e.g. ``"run/checkpoint/config.json: model"``; keys
    without a spec are left to the caller.
    """
    if not isinstance(values, Mapping):
        raise GrulabError(f"{where} must be a JSON object, got {_shown(values)}; {fix}")
    for name in required:
        if name not in values:
            raise GrulabError(f"{where}.{name} is missing; {fix}")
    for name, spec in specs.items():
        if name in values:
            problem = spec.problem(values[name])
            if problem:
                raise GrulabError(f"{where}.{name} = {_shown(values[name])} is {problem}; {fix}")


def check_flag(name: str, value: Any, spec: Spec) -> None:
    """A command-line value: UsageError ``--name VALUE is ...`` (exit code 2) if ``spec`` refuses it."""
    from .errors import UsageError

    problem = spec.problem(value) if value is not None else None
    if problem:
        raise UsageError(f"--{name.replace('_', '-')} {_shown(value)} is {problem}")


def check_flags(values: Mapping[str, Any], specs: Mapping[str, Spec]) -> None:
    """:func:`check_flag` for each given flag that has a spec."""
    for name, value in values.items():
        if name in specs:
            check_flag(name, value, specs[name])


def finite_perplexity(nll: float, source: str) -> float:
    """exp(mean negative log-likelihood); GrulabError if it is NaN (the model's outputs are not finite)."""
    if nll != nll:
        raise GrulabError(f"the perplexity on {source} is nan: the model's outputs are not finite; "
                          "the checkpoint is damaged or its run diverged, use another one or retrain")
    return math.exp(nll) if nll < 709 else math.inf


def specs_of(cls) -> dict[str, Spec]:
    """The table of a config dataclass, from its annotations:
    ``Annotated[T, spec]`` gives ``spec``, ``Literal[...]`` a Choice, ``bool`` Bool,
    ``str`` Text, ``list[str]`` Texts; other fields are not checked."""
    hints = typing.get_type_hints(cls, include_extras=True)
    table: dict[str, Spec] = {}
    for f in fields(cls):
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            table[f.name] = next(a for a in hint.__metadata__ if hasattr(a, "problem"))
        elif origin is typing.Literal:
            table[f.name] = Choice(typing.get_args(hint))
        elif hint is bool:
            table[f.name] = Bool()
        elif hint is str:
            table[f.name] = Text()
        elif origin is list and typing.get_args(hint) == (str,):
            table[f.name] = Texts()
    return table


# --------------------------------------------------------------------------- the tables
# The model section of config.json (grulab.model.ModelConfig). The upper bounds keep a
# damaged file from asking for terabytes: 65536 hidden units are 50 GB of float32
# weights per layer already.
MODEL_FIELDS: dict[str, Spec] = {
    "vocab_size": Int(1, 2**24),
    "cell": Choice(CELLS),
    "hidden": Int(1, 65536),
    "layers": Int(1, 256),
    "dropout": Real(0, 1, high_open=True),
    "embed": Int(0, 65536),
    "reset_after": Bool(),
    "impl": Choice(IMPLS),
}

# The training section of config.json (grulab.train.TrainConfig), which also holds the
# model's fields: the same table checks `grulab train`'s flags. Seeds are what
# torch.Generator.manual_seed takes; Adam's float32 step, lr / (1 - beta1), overflows past ~3e37.
SEED = Int(0, 2**64 - 1)
TRAIN_FIELDS: dict[str, Spec] = {
    **{k: v for k, v in MODEL_FIELDS.items() if k != "vocab_size"},
    "corpus": Text(),
    "level": Choice(("char", "word")),
    "min_freq": Int(0, 2**31),
    "d2l_text": Bool(),
    "val_fraction": Real(0, 1, high_open=True),
    "batch_size": Int(1, 2**20),
    "num_steps": Int(1, 2**20),
    "lr": Real(0, 1e30, low_open=True),
    "clip": Real(0, math.inf),
    "seed": SEED,
    "prefixes": Texts(),
}
