"""Config dataclasses where every field is one fact: type, default, help text and rule.

    @dataclass
    class TrainConfig(ModelArgs):
        lr: float = option(3e-3, "peak learning rate", rule=POSITIVE)

:func:`option` keeps the help text, the allowed values (``choices``) and the
rule in the field's metadata. :class:`Config` checks every field against them
after ``__init__`` (and so after ``dataclasses.replace``); the command line
builds its flags, ``choices=`` and ``--help`` from the same metadata. A wrong
value raises :class:`grulab.errors.ConfigError` naming the parameter.
"""
from __future__ import annotations

import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Collection, Optional

from grulab.errors import ConfigError, GrulabError


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``ok(value)`` tests it, ``want`` says it in words."""

    want: str
    ok: Callable[[Any], bool]


POSITIVE_INT = Rule("a positive integer", lambda v: v >= 1)
COUNT = Rule("an integer >= 0", lambda v: v >= 0)
POSITIVE = Rule("a positive number", lambda v: v > 0)
NON_NEGATIVE = Rule("a number >= 0", lambda v: v >= 0)
FRACTION = Rule("in [0, 1)", lambda v: 0 <= v < 1)


def up_to(rule: Rule, high) -> Rule:
    """``rule``, and at most ``high``: a size cap, so that a damaged config.json or a slip of the
    keyboard is refused in one line instead of asking for terabytes."""
    return Rule(f"{rule.want} up to {high:,}", lambda v: rule.ok(v) and v <= high)


SEED = Rule(f"an integer in [0, {2**64 - 1}] (what torch.manual_seed takes)", lambda v: 0 <= v < 2**64)

_TYPE_WANT = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
              list: "a list of strings"}


def option(default=MISSING, help: str = "", *, choices: Optional[Collection[str]] = None,
           rule: Optional[Rule] = None, flag: Optional[str] = None, flag_help: Optional[str] = None,
           default_help: Optional[str] = None, resumable: bool = False):
    """A dataclass field with its help text and rule in ``metadata``.

    ``choices``: the allowed values (a tuple, or a registry dict whose keys count);
    ``rule``: a :class:`Rule` for numbers; ``flag``: the command-line flag when it is
    not ``--field-name`` (``flag_help`` says what giving a boolean flag does);
    ``default_help``: the default in words, where the value (``[]``, ``None``) says
    little; ``resumable``: may change on ``grulab train --resume``. A field with no
    default is keyword-only.
    """
    metadata = dict(help=help, choices=choices, rule=rule, flag=flag, flag_help=flag_help,
                    default_help=default_help, resumable=resumable)
    if default is MISSING:
        return field(kw_only=True, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Config:
    """Base of the config dataclasses: checks each field, then ``check()``'s cross-field rules."""

    def __post_init__(self) -> None:
        for name, value in checked(type(self), {f.name: getattr(self, f.name) for f in fields(self)}).items():
            setattr(self, name, value)
        self.check()

    def check(self) -> None:
        """Rules that tie fields together; subclasses extend it."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The config saved by :meth:`to_dict`; keys this version does not know are refused."""
        if not isinstance(d, dict):
            raise GrulabError(f"a {cls.__name__} must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise GrulabError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**d)


def checked(cls, values: dict) -> dict:
    """The values of ``cls``'s fields found in ``values``, each checked and normalised as ``cls(...)``
    would (ConfigError for the first bad one), without building anything; other keys are left out.
    Used on a config.json before any tensor is allocated."""
    hints = typing.get_type_hints(cls)
    return {f.name: _checked(f, typing.get_origin(hints[f.name]) or hints[f.name], values[f.name])
            for f in fields(cls) if f.name in values}


def _checked(f, kind: type, value):
    """``value`` for field ``f`` of type ``kind``, normalised (int -> float, path -> str), or ConfigError."""
    meta = f.metadata
    want = meta["rule"].want if meta.get("rule") else _TYPE_WANT.get(kind, kind.__name__)
    if kind is str and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind is list and isinstance(value, tuple):
        value = list(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    fits = {bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, float) and math.isfinite(v),
            str: lambda v: isinstance(v, str),
            list: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}[kind]
    if not fits(value) or (meta.get("rule") and not meta["rule"].ok(value)):
        raise ConfigError(f.name, want, value)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f.name, "one of " + ", ".join(choices), value)
    return value


def flag(f) -> str:
    """The command-line flag of a config field: ``--num-steps`` for ``num_steps``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
