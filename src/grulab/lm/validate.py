"""Check a saved config (a checkpoint's config.json) before anything is built from it.

The rules are the config dataclasses' own (:func:`grulab.lm.config.option`: type,
``choices``, ``rule`` with its size caps), read through :func:`grulab.lm.config.checked`;
this module only says where the value was and how to fix it, in one line:

    check_section(config["model"], ModelConfig, "run/checkpoint/config.json: model", "restore ...")
    # GrulabError: run/checkpoint/config.json: model.hidden must be a positive integer up to 65,536,
    #              got 1000000000; restore ...

Flags need nothing here: the command line builds its configs through the same
dataclasses, whose ConfigError the CLI tells as the flag.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any, Mapping

from grulab.lm.config import checked
from grulab.errors import ConfigError, GrulabError


def _shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def check_section(values: Any, cls, where: str, fix: str) -> None:
    """GrulabError for a section that is not a JSON object, a field of ``cls`` without a default that
    is missing, or the first value ``cls``'s rules refuse. Keys ``cls`` does not know are left alone
    (a checkpoint of an earlier version may hold them)."""
    if not isinstance(values, Mapping):
        raise GrulabError(f"{where} must be a JSON object, got {_shown(values)}; {fix}")
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values:
            raise GrulabError(f"{where}.{f.name} is missing; {fix}")
    try:
        checked(cls, values)
    except ConfigError as e:
        raise GrulabError(f"{where}.{e.name} must be {e.want}, got {_shown(e.value)}; {fix}") from None


def finite_perplexity(nll: float, source: str) -> float:
    """exp(mean negative log-likelihood); GrulabError if it is NaN (the model's outputs are not finite)."""
    if nll != nll:
        raise GrulabError(f"the perplexity on {source} is nan: the model's outputs are not finite; "
                          "the checkpoint is damaged or its run diverged, use another one or retrain")
    return math.exp(nll) if nll < 709 else math.inf
