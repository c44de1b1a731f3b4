"""The README, followed top to bottom, just works: every shell and Python block of README.md, and
of the docs/ pages it links, runs here in document order.

The blocks share one temporary working directory (a block that trains a run feeds the next one
that samples from it), with the user's environment and cache (``$GRULAB_CACHE``, where the native
build and the measured kernel choices live). Each block is one test case, named ``page:line``.
What the test may change in a command, and nothing else:

* budgets: ``grulab train`` and ``grulab compare`` run ``--max-minutes M`` as 0.01 + 0.005·M
  minutes (a longer budget stays longer, so ``--resume`` with a larger one still trains), added where a command has none; ``max_minutes=`` in Python likewise;
  ``grulab generate --length`` at most 100;
* the corpus: ``timemachine`` (downloaded on first use) becomes the bundled ``austen``.

A block that cannot run on a test machine (two machines, a GPU, a browser, the whole suite, a
benchmark) is marked in the page by a comment on the line right before its fence,
``<!-- readme-test: skip (why) -->``, and is reported as skipped with that reason. In a block with
``$ command`` lines, only those run; when the output shown under one is a ``grulab: error:`` line,
the command must fail with that line on stderr and no traceback.

Besides the blocks: the README stays under 300 lines, every relative link of these pages leads to
a file (and heading) that exists, the pages name no internal issue numbers, and the CLI reference
lists exactly the flags of each command.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # grulab and torchrun of this environment

FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.*)\)\s*-->")
SHELL, PYTHON = {"sh", "bash", "shell", "console"}, {"python", "py"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

SCALE, MIN_MINUTES = 0.005, 0.01  # M minutes become 0.01 + 0.005 M: 3 -> 0.025 (1.5 s), 6 -> 0.04 (2.4 s)
MAX_LENGTH = 100
SWAP_CORPUS = {"timemachine": "austen"}  # a download in the page, a bundled text here
TIMEOUT = 300  # seconds per command (torchrun starts several processes)

ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONIOENCODING": "utf-8",
       "NO_COLOR": "1", "COLUMNS": "120", "MPLBACKEND": "Agg",
       "OMP_NUM_THREADS": "1"}  # tiny runs: on a busy machine torch's thread pool only spins


@dataclass(frozen=True)
class Block:
    page: Path  # relative to the repository
    line: int  # of the opening fence
    lang: str  # "sh" or "python" (normalised)
    code: str
    skip: Optional[str]  # the reason, if marked

    @property
    def id(self) -> str:
        return f"{self.page.as_posix()}:{self.line}"


def linked_pages(page: Path = README) -> list[Path]:
    """The docs/ pages the README links, in the order of their first link."""
    pages: list[Path] = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        path = target.split("#")[0]
        if not path or "://" in path or not path.endswith(".md"):
            continue
        resolved = (page.parent / path).resolve()
        if resolved.parent == ROOT / "docs" and resolved not in pages:
            pages.append(resolved)
    return pages


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marked = SKIP.search(before)
        if lang in SHELL | PYTHON:
            blocks.append(Block(page.relative_to(ROOT), start + 1, "sh" if lang in SHELL else "python",
                                "\n".join(lines[start + 1:j]) + "\n", marked.group(1) if marked else None))
        i = j + 1
    return blocks


PAGES = [README, *linked_pages()]
BLOCKS = [b for page in PAGES for b in blocks_of(page)]


# ------------------------------------------------------------------------------------------ rewriting
def _minutes(value: str) -> str:
    minutes = float(value)
    return f"{MIN_MINUTES + SCALE * minutes if minutes > 0 else MIN_MINUTES:g}"  # longer stays longer (--resume)


def _grulab_at(words: list[str]) -> Optional[int]:
    """Index of the grulab command word (``grulab``, or ``-m grulab`` under python/torchrun)."""
    for i, w in enumerate(words):
        if w == "grulab" or w.endswith("/grulab"):
            return i
        if w == "-m" and i + 1 < len(words) and words[i + 1] in ("grulab", "grulab.cli"):
            return i + 1
    return None


def rewrite_command(command: str) -> str:
    """The command with the budget shortened and the downloaded corpus swapped; else as written."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return command
    at = _grulab_at(words)
    if at is None or at + 1 >= len(words) or any(w in ("|", ">", ">>", "<", "&&", "||", ";") for w in words):
        return command
    sub, out = words[at + 1], list(words)
    for i, w in enumerate(out):
        if w in SWAP_CORPUS and i > at:
            out[i] = SWAP_CORPUS[w]
        elif w.startswith("--corpus=") and w.split("=", 1)[1] in SWAP_CORPUS:
            out[i] = "--corpus=" + SWAP_CORPUS[w.split("=", 1)[1]]
    if sub in ("train", "compare"):
        where = [i for i, w in enumerate(out) if w == "--max-minutes" or w.startswith("--max-minutes=")]
        for i in where:
            if out[i] == "--max-minutes" and i + 1 < len(out):
                out[i + 1] = _minutes(out[i + 1])
            elif "=" in out[i]:
                out[i] = "--max-minutes=" + _minutes(out[i].split("=", 1)[1])
        if not where and "--resume" not in out:
            out += ["--max-minutes", f"{MIN_MINUTES:g}"]
    if sub == "generate":
        for i, w in enumerate(out[:-1]):
            if w == "--length" and out[i + 1].isdigit():
                out[i + 1] = str(min(int(out[i + 1]), MAX_LENGTH))
    return shlex.join(out) if out != words else command


def rewrite_python(code: str) -> str:
    code = re.sub(r"\bmax_minutes\s*=\s*([0-9.]+)", lambda m: f"max_minutes={_minutes(m.group(1))}", code)
    for old, new in SWAP_CORPUS.items():
        code = re.sub(rf"""(\bcorpus\s*=\s*)(["']){old}\2""", rf"\g<1>\g<2>{new}\g<2>", code)
    return code


@dataclass
class Command:
    text: str  # as written in the page (continuation lines joined)
    error: Optional[str] = None  # the `grulab: error:` line shown under it: the command must fail with it


def shell_commands(code: str) -> list[Command]:
    """The commands of a shell block: its `$` lines if it has any (with the output shown under each),
    else every line; backslash continuations joined, blank and comment-only lines dropped."""
    joined, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending)
    if any(line.startswith("$ ") for line in joined):
        commands: list[Command] = []
        for line in joined:
            if line.startswith("$ "):
                commands.append(Command(line[2:].strip()))
            elif commands and commands[-1].error is None and line.startswith("grulab: error:"):
                commands[-1].error = line.strip()
        return commands
    return [Command(line.strip()) for line in joined if line.strip() and not line.strip().startswith("#")]


# ------------------------------------------------------------------------------------------ running
def _report(what: str, proc: subprocess.CompletedProcess) -> str:
    return (f"{what}\nexit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One working directory for every block, in document order."""
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block(block: Block, workdir: Path):
    if block.skip is not None:
        pytest.skip(block.skip)
    if block.lang == "python":
        code = rewrite_python(block.code)
        script = workdir / "_readme_block.py"
        script.write_text(code, encoding="utf-8")
        proc = subprocess.run([sys.executable, script.name], cwd=workdir, env=ENV, capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=TIMEOUT)
        what = f"{block.id}: the Python block, run as\n{code}"
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, _report(what, proc)
        return
    for command in shell_commands(block.code):
        run = rewrite_command(command.text)
        what = f"{block.id}: {command.text}" + (f"\n(run as: {run})" if run != command.text else "")
        proc = subprocess.run(["bash", "-c", run], cwd=workdir, env=ENV, capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=TIMEOUT)
        assert "Traceback" not in proc.stderr, _report(what, proc)
        if command.error is None:
            assert proc.returncode == 0, _report(what, proc)
        else:
            assert proc.returncode != 0 and command.error in proc.stderr, \
                _report(f"{what}\nexpected to fail with: {command.error}", proc)


# ------------------------------------------------------------------------------------------ the pages
def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "cli.md", "performance.md", "distributed.md", "mingru.md"} <= names, names
    assert any(b.skip is None for b in BLOCKS)


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move a section to docs/ and link it"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(page: Path) -> set[str]:
    in_code, anchors = False, set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_links(page: Path):
    """Every relative link leads to a file that exists, and an anchor to a heading of it."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_no_internal_references(page: Path):
    """User docs name the notes by title, not by the tracker's numbers or the course's seed numbers."""
    text = page.read_text(encoding="utf-8")
    found = re.findall(r"\b(?:issue|seed)\s+#?0*\d+\b(?![.,]\d)", text, flags=re.IGNORECASE)
    found = [f for f in found if not re.fullmatch(r"seed\s+[1-9]\d*", f, flags=re.IGNORECASE)]  # `--seed 1`
    assert not found, f"{page.relative_to(ROOT)} names {found}: name the notes by title instead"


def _reference_flags() -> dict[str, set[str]]:
    """The flags the CLI reference lists under each `## grulab COMMAND` heading (first column of its tables)."""
    flags: dict[str, set[str]] = {}
    command = None
    for line in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"## grulab (\w+)", line)
        if m:
            command = m.group(1)
            flags[command] = set()
        elif command and line.startswith("| `"):
            first = line.split("|")[1]
            flags[command] |= set(re.findall(r"--[a-z][a-z0-9-]*", first))
    return flags


def test_cli_reference_lists_every_flag():
    from grulab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = _reference_flags()
    assert set(listed) == set(sub.choices), "docs/cli.md's sections against the commands"
    # "All the model and training flags of grulab train apply to every run, except --cell, --resume and --nproc"
    listed["compare"] |= listed["train"] - {"--cell", "--resume", "--no-resume", "--nproc", "--preset"}
    wrong = []
    for name, parser in sub.choices.items():
        real = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        if real != listed[name]:
            wrong.append(f"grulab {name}: missing {sorted(real - listed[name])}, "
                         f"not a flag {sorted(listed[name] - real)}")
    assert not wrong, "docs/cli.md against the parsers: " + "; ".join(wrong)
