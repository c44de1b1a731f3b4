"""The command line's flags: every boolean has its --no- form, and every flag a message names exists.

A preset sets booleans (--d2l-text, --reset-before); the flags given win over it, so each boolean
must be reachable both ways. And a message that tells the user to type a flag must name one that
is there: these tests read every help text of every grulab command, and every string in grulab's
source that could reach the user (docstrings aside), and look each --flag up in the parsers.
"""
from __future__ import annotations

import argparse
import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

import grulab
from grulab.cli import build_parser, config_from_args
from grulab.lm.config import flag
from grulab.lm.train import TrainConfig

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")  # "--no-" alone is no flag
SOURCE = Path(grulab.__file__).parent
#: Flags of other programs that grulab's messages may name, each with the program whose flag it is.
#: torchrun's are checked against torchrun's own parser below; pip's are taken as written.
PIP_FLAGS = {"--no-build-isolation"}


def parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    """(command path, parser) for grulab and each of its commands."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, path + (name,))


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.fixture(scope="module")
def commands() -> dict[tuple, argparse.ArgumentParser]:
    return dict(parsers(build_parser()))


@pytest.fixture(scope="module")
def torchrun_flags() -> set[str]:
    from torch.distributed.run import get_args_parser

    return option_strings(get_args_parser())


def test_every_boolean_flag_has_its_no_form(commands):
    switches = 0
    for path, parser in commands.items():
        for action in parser._actions:
            if action.nargs != 0 or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert isinstance(action, argparse.BooleanOptionalAction), (path, action.option_strings)
            positive = [s for s in action.option_strings if not s.startswith("--no-")]
            assert positive and all("--no-" + s[2:] in action.option_strings for s in positive), action.option_strings
            switches += 1
    assert switches >= 8  # train's and compare's config booleans, eval --json, kernels --reset-before, --forget


BOOLEANS = [f for f in fields(TrainConfig) if f.type in (bool, "bool")]


@pytest.mark.parametrize("field", BOOLEANS, ids=lambda f: f.name)
def test_both_forms_of_every_training_boolean(field):
    parser = build_parser()
    name = flag(field)
    positive = "--" + name[len("--no-"):] if name.startswith("--no-") else name
    negative = "--no-" + positive[2:]
    on = getattr(parser.parse_args(["train", positive]), field.name)
    off = getattr(parser.parse_args(["train", negative]), field.name)
    assert on is not off and {on, off} == {True, False}
    assert getattr(parser.parse_args(["train", positive, negative]), field.name) is off  # the last one wins
    assert not hasattr(parser.parse_args(["train"]), field.name)  # not given: the preset's or the default stays


def test_no_forms_turn_a_presets_booleans_off():
    args = build_parser().parse_args(["train", "--preset", "d2l", "--corpus", "austen", "--no-d2l-text",
                                      "--no-reset-before", "--no-progress"])
    config = config_from_args(args)
    assert (config.d2l_text, config.reset_after, config.progress) == (False, True, False)
    assert (config.init, config.hidden, config.lr) == ("d2l", 256, 1.0)  # the rest of the preset stays
    config = config_from_args(build_parser().parse_args(["train", "--preset", "d2l", "--corpus", "austen"]))
    assert (config.d2l_text, config.reset_after) == (True, False)


def test_the_other_commands_switches():
    parser = build_parser()
    assert parser.parse_args(["eval", "RUN", "TEXT", "--no-json"]).json is False
    assert parser.parse_args(["eval", "RUN", "TEXT", "--json"]).json is True
    assert parser.parse_args(["kernels"]).reset_before is False
    assert parser.parse_args(["kernels", "--reset-before", "--no-forget"]).reset_before is True


def _owner(text: str, start: int, end: int, here: tuple) -> tuple:
    """Whose flag the one at text[start:end] is: 'the --out of grulab train', 'grulab train --resume' and
    'torchrun --standalone --nproc-per-node N' name another command's; otherwise this command's."""
    after = re.match(r"\s+of\s+(?:`?grulab\s+)([a-z-]+)", text[end:])
    if after:
        return (after.group(1),)
    before = re.search(r"(?:grulab\s+([a-z-]+)|(torchrun))((?:\s+--[a-z-]+(?:[ =][A-Z0-9]+)?)*)\s+$", text[:start])
    if before:
        return ("torchrun",) if before.group(2) else (before.group(1),)
    return here


def test_every_flag_named_in_a_help_text_exists(commands, torchrun_flags):
    named = 0
    for path, parser in commands.items():
        texts = [parser.description or ""] + [a.help or "" for a in parser._actions]
        texts += [c.help or "" for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                  for c in a._choices_actions]
        for text in texts:
            for m in FLAG.finditer(text):
                owner = _owner(text, m.start(), m.end(), path)
                known = torchrun_flags if owner == ("torchrun",) else option_strings(commands[owner])
                assert m.group() in known, f"grulab {' '.join(path)} --help names {m.group()} ({owner}): {text!r}"
                named += 1
    assert named > 20


def _messages(path: Path):
    """Every string constant in a module that is not documentation (docstrings and bare string
    statements): error messages, warnings, help texts, log lines, f-string pieces."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_every_flag_named_in_grulabs_messages_exists(commands, torchrun_flags):
    grulab_flags = set().union(*map(option_strings, commands.values()))
    unknown, named = [], 0
    for module in sorted(SOURCE.rglob("*.py")):
        for line, text in _messages(module):
            for m in FLAG.findall(text):
                named += 1
                if m not in grulab_flags | torchrun_flags | PIP_FLAGS:
                    unknown.append(f"{module.relative_to(SOURCE)}:{line}: {m} in {text!r}")
    assert not unknown, "\n".join(unknown)
    assert named > 50


def test_the_old_d2l_message_would_be_caught(commands):
    """The check catches what it is for: the message that named --d2l, a flag that never existed."""
    grulab_flags = set().union(*map(option_strings, commands.values()))
    assert set(FLAG.findall("drop --d2l for non-English text")) - grulab_flags == {"--d2l"}
